"""Helpers shared by several test modules (test modules do not import each other).

The offline guard: a program run in a subprocess whose ``sitecustomize`` installs an audit hook
(``sys.addaudithook``): every socket connect / name look-up is logged and refused, and the first import of
each hub library logs whether the offline switches were already set. The parent environment's offline
variables are removed, so only the program's own switches count.

The trainer's helpers: an interrupt, a CPU config, the training log, a LoRA's tensors, a free port.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from ccsr.config import Config
from ccsr.inputs import OFFLINE_VARS
from ccsr.rundir import LORA_WEIGHTS_NAME

REPO = Path(__file__).resolve().parent.parent

SITECUSTOMIZE = '''
"""Test harness (tests/helpers.py): log and refuse any network access of this process."""
import json
import os
import socket
import sys

_LOG = os.environ["CCSR_NETWORK_LOG"]
_HUB = {"huggingface_hub", "transformers", "diffusers", "ultralytics"}
_seen = set()
_LOOKUPS = {"socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex", "socket.gethostbyaddr"}
_SENDS = {"socket.connect", "socket.sendto", "socket.sendmsg"}


def _record(kind, detail):
    with open(_LOG, "a", encoding="utf-8") as f:
        f.write(json.dumps({"kind": kind, "detail": detail, "pid": os.getpid()}) + "\\n")


def _hook(event, args):
    if event == "import":
        top = args[0].split(".")[0]
        if top in _HUB and top not in _seen:
            _seen.add(top)
            missing = [v for v in ("HF_HUB_OFFLINE", "YOLO_OFFLINE") if os.environ.get(v) != "1"]
            _record("hub-import", {"module": top, "offline_vars_missing": missing})
    elif event in _LOOKUPS:
        _record("lookup", repr(args[:2]))
        raise OSError("network access during an offline run (tests/helpers.py)")
    elif event in _SENDS:
        sock = args[0]
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            _record("connect", repr(args[1:]))
            raise OSError("network connection during an offline run (tests/helpers.py)")


sys.addaudithook(_hook)
'''


def run_guarded(
    tmp_path: Path, module: str, argv: list[str], timeout: int = 600, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess, list]:
    """``python -m module *argv`` from the repository root under the offline guard; returns the finished
    process and the guard's events (dicts with ``kind``: ``hub-import``, ``lookup`` or ``connect``).
    ``env``: variables set on top of the guarded environment."""
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir(exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    log = tmp_path / "network.jsonl"
    guarded = {k: v for k, v in os.environ.items() if k not in OFFLINE_VARS}
    guarded.update(
        PYTHONPATH=os.pathsep.join([str(hook_dir), str(REPO)]),
        CCSR_NETWORK_LOG=str(log),
        HF_HOME=str(tmp_path / "hf-home"),
        YOLO_CONFIG_DIR=str(tmp_path / "yolo-config"),
        **(env or {}),
    )
    proc = subprocess.run(
        [sys.executable, "-m", module, *argv],
        cwd=REPO,
        env=guarded,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    events = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return proc, events


def assert_offline(proc: subprocess.CompletedProcess, events: list) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]
    network = [e for e in events if e["kind"] in ("lookup", "connect")]
    assert network == [], f"network access attempted: {network}"
    late = [e["detail"] for e in events if e["kind"] == "hub-import" and e["detail"]["offline_vars_missing"]]
    assert late == [], f"hub libraries imported before the offline switches were set: {late}"


class Interrupt(Exception):
    """Raised from an ``on_step`` callback to stop a training run where a crash would."""


def make_cfg(model: str | Path, **trainer) -> Config:
    """A CPU config training the model at ``model`` with the given trainer settings (set in place, as a
    notebook would: the trainer checks them)."""
    cfg = Config()
    cfg.device = "cpu"
    cfg.generator.model = str(model)
    for key, value in trainer.items():
        setattr(cfg.trainer, key, value)
    return cfg


def read_log(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "train_log.jsonl").read_text().splitlines()]


def lora_tensors(lora_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(lora_dir / LORA_WEIGHTS_NAME))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def free_port() -> int:
    # accelerate's default port 29500 would collide with any other launch running on the machine.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
