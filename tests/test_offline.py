"""Offline by default for local models: the command line sets the hub/ultralytics offline switches itself,
before any hub library is imported, and a run on local models attempts no network connection.

The proof runs the real command in a subprocess whose ``sitecustomize`` installs an audit hook
(``sys.addaudithook``): every socket connect / name look-up is logged and refused, and the first import of
each hub library logs whether the offline switches were already set. The parent environment's offline
variables are removed, so only the program's own switches count.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ccsr.config import load_config
from ccsr.inputs import OFFLINE_VARS, all_models_local, set_offline

REPO = Path(__file__).resolve().parent.parent

SITECUSTOMIZE = '''
"""Test harness (tests/test_offline.py): log and refuse any network access of this process."""
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
        raise OSError("network access during an offline run (tests/test_offline.py)")
    elif event in _SENDS:
        sock = args[0]
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            _record("connect", repr(args[1:]))
            raise OSError("network connection during an offline run (tests/test_offline.py)")


sys.addaudithook(_hook)
'''


def run_guarded(
    tmp_path: Path, argv: list[str], timeout: int = 600
) -> tuple[subprocess.CompletedProcess, list]:
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir(exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    log = tmp_path / "network.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_VARS}
    env.update(
        PYTHONPATH=os.pathsep.join([str(hook_dir), str(REPO)]),
        CCSR_NETWORK_LOG=str(log),
        HF_HOME=str(tmp_path / "hf-home"),
        YOLO_CONFIG_DIR=str(tmp_path / "yolo-config"),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "ccsr.cli", *argv],
        cwd=REPO,
        env=env,
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


def test_the_harness_sees_a_look_up(tmp_path):
    """Without this, an empty log could mean a broken hook rather than an offline program."""
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    log = tmp_path / "network.jsonl"
    code = "import socket\ntry:\n    socket.getaddrinfo('example.com', 443)\nexcept OSError:\n    pass\n"
    env = {**os.environ, "PYTHONPATH": str(hook_dir), "CCSR_NETWORK_LOG": str(log)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    assert [json.loads(line)["kind"] for line in log.read_text().splitlines()] == ["lookup"]


def test_local_models_switch_offline_on_even_when_the_config_does_not(monkeypatch):
    for var in OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["offline=false"])
    assert all_models_local(cfg)
    set_offline(cfg)
    assert all(os.environ[v] == "1" for v in OFFLINE_VARS)


def test_hub_ids_stay_online_unless_the_config_says_offline(monkeypatch):
    for var in OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["offline=false", "judge.model=llava-hf/llava-v1.6"])
    assert not all_models_local(cfg)
    set_offline(cfg)
    assert not any(v in os.environ for v in OFFLINE_VARS)
    cfg.offline = True
    set_offline(cfg)
    assert all(os.environ[v] == "1" for v in OFFLINE_VARS)


def test_deciding_the_offline_switches_imports_no_hub_library(repo_root):
    """The decision runs before the switches are set, so it must not import what reads them (the hub's own
    repo-id validation is used later, by check_models). Checked in a fresh process without the switches."""
    code = (
        "import sys\n"
        "from ccsr.inputs import all_models_local, set_offline\n"
        "from ccsr.config import load_config\n"
        "for name in ('tiny',):\n"
        "    cfg = load_config(f'configs/{name}.yaml', ['offline=false'])\n"
        "    assert all_models_local(cfg), name\n"
        "    set_offline(cfg)\n"
        "hub = {'huggingface_hub', 'transformers', 'diffusers', 'ultralytics', 'torch'}\n"
        "print(sorted(hub & {m.split('.')[0] for m in sys.modules}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_VARS}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_validate_and_generate_make_no_connection(tmp_path):
    proc, events = run_guarded(tmp_path, ["validate", "--config", "configs/tiny.yaml"])
    assert_offline(proc, events)
    out = tmp_path / "out" / "giraffe.png"
    argv = ["generate", "--config", "configs/tiny.yaml", "--prompt", "a giraffe", "--out", str(out)]
    proc, events = run_guarded(tmp_path, [*argv, "--set", "generator.steps=2", "--num", "2"])
    assert_offline(proc, events)
    assert sorted(p.name for p in out.parent.iterdir()) == ["giraffe-0.png", "giraffe-1.png"]
    assert any(e["kind"] == "hub-import" and e["detail"]["module"] == "diffusers" for e in events)


LOOP_MODULES = ("ccsr/detector.py", "ccsr/tiny/yolo.py", "ccsr/trainer.py")


@pytest.mark.slow
@pytest.mark.skipif(
    not all((REPO / m).exists() for m in LOOP_MODULES), reason="the detector or trainer is not there yet"
)
def test_a_tiny_loop_iteration_makes_no_connection(tmp_path):
    sets = [
        "prompter.n_prompts=1",
        "prompter.n_validation=1",
        "prompter.max_new_tokens=48",
        "generator.num_candidates=2",
        "generator.steps=2",
        "trainer.epochs=1",
        "evaluator.seeds=[0]",
        "evaluator.scales=[0.0, 1.0]",
    ]
    argv = ["run", "--config", "configs/tiny.yaml", "--class", "giraffe", "--run-dir", str(tmp_path / "run")]
    argv += ["--iterations", "1"]
    for s in sets:
        argv += ["--set", s]
    proc, events = run_guarded(tmp_path, argv)
    assert_offline(proc, events)
    modules = {e["detail"]["module"] for e in events if e["kind"] == "hub-import"}
    assert {"transformers", "diffusers", "ultralytics"} <= modules, modules
    assert (tmp_path / "run" / "iterations" / "001" / "stages.json").exists()
