"""Crash safety: SIGKILL at many moments over every stage, SIGTERM mid-stage; the result equals an uninterrupted run.

The tiny loop runs in a subprocess (``ccsr daemon``) with small settings; a reference run goes uninterrupted.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ccsr.rundir import STAGES, read_jsonl

pytestmark = pytest.mark.slow

SMALL = [
    "prompter.n_prompts=2",
    "prompter.n_validation=1",
    "generator.num_candidates=4",
    "generator.steps=4",
    "evaluator.seeds=[0]",
    "evaluator.scales=[0.0, 1.0]",
    "trainer.epochs=4",
    "trainer.batch_size=1",
    "trainer.checkpoint_every=1",
    "gate.margin=-1",
]
RECORDS = ("prompts.jsonl", "candidates.jsonl", "judgments.jsonl", "detections.jsonl", "pairs.jsonl")


def daemon_cmd(run_dir: Path) -> list[str]:
    cmd = [sys.executable, "-m", "ccsr.cli", "daemon", "--config", "configs/tiny.yaml", "--class", "giraffe"]
    cmd += ["--run-dir", str(run_dir), "--iterations", "1"]
    for s in SMALL:
        cmd += ["--set", s]
    return cmd


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.setdefault("OMP_NUM_THREADS", "2")
    return e


def start(run_dir: Path, repo_root: Path) -> subprocess.Popen:
    return subprocess.Popen(
        daemon_cmd(run_dir), cwd=repo_root, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def heartbeat_stage(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "heartbeat.json").read_text()).get("stage")
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def wait_for_stage(proc: subprocess.Popen, run_dir: Path, stage: str, timeout: float = 300) -> bool:
    """True once the heartbeat reports ``stage`` (or a later one); False if the process ended first."""
    order = {s: i for i, s in enumerate(STAGES)}
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        current = heartbeat_stage(run_dir)
        if current in order and order[current] >= order[stage]:
            return True
        time.sleep(0.05)
    raise TimeoutError(f"stage {stage} not reached")


def snapshot(run_dir: Path) -> dict:
    it = run_dir / "iterations" / "001"
    out = {name: read_jsonl(it / name) for name in RECORDS}
    out["validation"] = read_jsonl(run_dir / "validation_prompts.jsonl")
    out["eval"] = json.loads((it / "eval.json").read_text())
    # Tensors, not file bytes: safetensors writes its metadata map in a per-process order.
    from safetensors.torch import load_file

    weights = load_file(it / "lora" / "pytorch_lora_weights.safetensors")
    out["lora"] = {name: t.numpy().tobytes() for name, t in sorted(weights.items())}
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, repo_root):
    run_dir = tmp_path_factory.mktemp("ref") / "giraffe"
    done = subprocess.run(daemon_cmd(run_dir), cwd=repo_root, env=env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return snapshot(run_dir)


def test_sigkill_at_random_moments_in_every_stage(tmp_path, repo_root, reference):
    run_dir = tmp_path / "giraffe"
    rng = random.Random(20261122)
    kills = []
    for stage in STAGES:
        for _ in range(2):
            proc = start(run_dir, repo_root)
            if not wait_for_stage(proc, run_dir, stage):
                break  # finished before reaching this stage again
            time.sleep(rng.uniform(0.0, 1.5))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills.append(heartbeat_stage(run_dir))
            proc.wait()
    assert len(kills) >= 10, kills
    assert {"candidates", "judge", "train"} <= set(kills), kills
    final = subprocess.run(daemon_cmd(run_dir), cwd=repo_root, env=env(), capture_output=True, text=True)
    assert final.returncode == 0, final.stderr[-2000:]
    got = snapshot(run_dir)
    for key in reference:
        assert got[key] == reference[key], f"{key} differs after {len(kills)} kills at {kills}"
    assert not list(run_dir.rglob(".*.tmp*")), "temporary files left behind"


def test_sigterm_mid_stage_exits_cleanly_and_resumes(tmp_path, repo_root, reference):
    run_dir = tmp_path / "giraffe"
    proc = start(run_dir, repo_root)
    assert wait_for_stage(proc, run_dir, "judge")
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=120)
    assert code == 0, proc.stderr.read().decode()[-2000:]
    events = [e["event"] for e in read_jsonl(run_dir / "events.jsonl")]
    assert events[-1] == "stopped"
    final = subprocess.run(daemon_cmd(run_dir), cwd=repo_root, env=env(), capture_output=True, text=True)
    assert final.returncode == 0, final.stderr[-2000:]
    got = snapshot(run_dir)
    for key in reference:
        assert got[key] == reference[key], key


def test_sigterm_in_training_stops_within_one_step_and_resumes(tmp_path, repo_root, reference):
    """Training's unit is one optimizer step: a signal there does not wait for the remaining steps."""
    run_dir = tmp_path / "giraffe"
    proc = start(run_dir, repo_root)
    assert wait_for_stage(proc, run_dir, "train")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()[-2000:]
    assert read_jsonl(run_dir / "events.jsonl")[-1]["event"] == "stopped"
    stages = json.loads((run_dir / "iterations" / "001" / "stages.json").read_text())
    assert "train" not in stages, "training ran to its end before stopping"
    final = subprocess.run(daemon_cmd(run_dir), cwd=repo_root, env=env(), capture_output=True, text=True)
    assert final.returncode == 0, final.stderr[-2000:]
    got = snapshot(run_dir)
    for key in reference:
        assert got[key] == reference[key], key


def test_stop_file_stops_and_is_consumed(tmp_path, repo_root):
    run_dir = tmp_path / "giraffe"
    proc = start(run_dir, repo_root)
    assert wait_for_stage(proc, run_dir, "candidates")
    (run_dir / "STOP").write_text("")
    assert proc.wait(timeout=120) == 0
    assert not (run_dir / "STOP").exists()
    assert read_jsonl(run_dir / "events.jsonl")[-1]["reason"] == "stop file"


def test_second_process_is_refused_with_the_holders_pid(tmp_path, repo_root):
    run_dir = tmp_path / "giraffe"
    proc = start(run_dir, repo_root)
    try:
        assert wait_for_stage(proc, run_dir, "prompts")
        second = subprocess.run(daemon_cmd(run_dir), cwd=repo_root, env=env(), capture_output=True, text=True)
        assert second.returncode == 2
        assert f"pid {proc.pid}" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        proc.kill()
        proc.wait()
