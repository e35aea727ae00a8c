"""Offline by default for local models: the command line sets the hub/ultralytics offline switches itself,
before any hub library is imported, and a run on local models attempts no network connection.

The proof runs the real command in a subprocess under the offline guard of ``tests/helpers.py``: an audit
hook logs and refuses every socket connect / name look-up, and logs whether the offline switches were set
before the first import of each hub library. The parent environment's offline variables are removed, so only
the program's own switches count.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ccsr.config_files import load_config
from ccsr.inputs import OFFLINE_VARS, all_models_local, set_offline
from tests.helpers import REPO, SITECUSTOMIZE, assert_offline, run_guarded


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
        "from ccsr.config_files import load_config\n"
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
    proc, events = run_guarded(tmp_path, "ccsr.cli", ["validate", "--config", "configs/tiny.yaml"])
    assert_offline(proc, events)
    out = tmp_path / "out" / "giraffe.png"
    argv = ["generate", "--config", "configs/tiny.yaml", "--prompt", "a giraffe", "--out", str(out)]
    proc, events = run_guarded(tmp_path, "ccsr.cli", [*argv, "--set", "generator.steps=2", "--num", "2"])
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
    proc, events = run_guarded(tmp_path, "ccsr.cli", argv)
    assert_offline(proc, events)
    modules = {e["detail"]["module"] for e in events if e["kind"] == "hub-import"}
    assert {"transformers", "diffusers", "ultralytics"} <= modules, modules
    assert (tmp_path / "run" / "iterations" / "001" / "stages.json").exists()
