"""The loop under a launcher: two gloo processes (``accelerate launch --multi_gpu``, the CPU's gloo ranks)
against one process on the same config and seed, and a two-process run killed mid-way then finished by one
process. The sharded stages' records and pixels must be identical; the LoRA, trained data-parallel, equal to
float rounding (``tests/test_trainer_multiprocess.py``)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from ccsr.distributed import Ranks, merge_shards, read_committed, shard_files
from ccsr.records import Candidate, append_records, read_records
from ccsr.rundir import read_jsonl

SMALL = [
    "prompter.n_prompts=3",
    "prompter.n_validation=2",
    "generator.num_candidates=3",
    "generator.steps=3",
    "generator.batch_size=2",  # evaluation units of 2 jobs: 2 held-out prompts x 2 seeds = 2 units per scale
    "judge.batch_size=2",
    "evaluator.seeds=[0, 1]",
    "evaluator.scales=[0.0, 1.0]",
    "trainer.epochs=2",
    "trainer.batch_size=2",
    "gate.margin=-1",
]
RECORDS = ("prompts.jsonl", "candidates.jsonl", "judgments.jsonl", "detections.jsonl", "pairs.jsonl")


# --- the pieces -------------------------------------------------------------------------------------------


def test_every_unit_goes_to_exactly_one_rank():
    for world in (1, 2, 3, 5):
        units = list(range(11))
        shares = [Ranks(world, r).mine(units) for r in range(world)]
        assert sorted(u for share in shares for u in share) == units
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_bad_launcher_environment_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK=2"):
        Ranks.from_env()
    monkeypatch.setenv("RANK", "1")
    assert Ranks.from_env() == Ranks(2, 1) and not Ranks(2, 1).is_main


def test_merge_counts_each_unit_once_in_one_process_order(tmp_path):
    path = tmp_path / "candidates.jsonl"

    def cand(pid: str, i: int) -> Candidate:
        return Candidate(pid, i, i, f"{pid}-{i}.png")

    # Rank 1 committed p1 (twice: a crash after a merge left it in the main file and its shard), rank 0 p0.
    append_records(path, [cand("p1", 0)])
    append_records(Ranks(2, 1).shard_path(path), [cand("p1", 0), cand("p1", 1)])
    append_records(Ranks(2, 0).shard_path(path), [cand("p0", 1), cand("p0", 0)])
    assert len(shard_files(path)) == 2 and len(read_committed(path, Candidate)) == 5
    order = {"p0": 0, "p1": 1}
    merged = merge_shards(
        path, Candidate, lambda c: (c.prompt_id, c.index), lambda c: (order[c.prompt_id], c.index)
    )
    assert [(c.prompt_id, c.index) for c in merged] == [("p0", 0), ("p0", 1), ("p1", 0), ("p1", 1)]
    assert read_records(path, Candidate) == merged and shard_files(path) == []


# --- the whole loop -----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ccsr_run(run_dir: Path, processes: int) -> list[str]:
    args = ["run", "--config", "configs/tiny.yaml", "--class", "giraffe", "--run-dir", str(run_dir)]
    args += ["--iterations", "1"]
    for s in SMALL:
        args += ["--set", s]
    if processes == 1:
        return [sys.executable, "-m", "ccsr", *args]
    launch = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu"]
    launch += [
        f"--num_processes={processes}",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
    ]
    return [*launch, f"--main_process_port={free_port()}", "-m", "ccsr", *args]


def env() -> dict[str, str]:
    # One thread per process in every run: CPU results depend on the thread count.
    return {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def run_to_end(run_dir: Path, processes: int, repo_root: Path, *sets: str) -> subprocess.CompletedProcess:
    command = ccsr_run(run_dir, processes) + [a for s in sets for a in ("--set", s)]
    done = subprocess.run(command, cwd=repo_root, env=env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def snapshot(run_dir: Path) -> dict:
    """What must not depend on the number of processes: the sharded stages' records, the images' bytes, the
    base model's evaluation (scale 0); and, to float rounding, the LoRA."""
    it = run_dir / "iterations" / "001"
    out = {name: read_jsonl(it / name) for name in RECORDS}
    out["validation"] = read_jsonl(run_dir / "validation_prompts.jsonl")
    out["candidate_pixels"] = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((it / "candidates").glob("*.png"))
    }
    records = read_jsonl(it / "eval" / "records.jsonl")
    out["eval_base"] = [r for r in records if r["scale"] == 0.0]
    out["eval_jobs"] = [(r["scale"], r["prompt_id"], r["seed"], r["path"]) for r in records]
    return out


def lora(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "iterations" / "001" / "lora" / "pytorch_lora_weights.safetensors")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, repo_root) -> Path:
    from ccsr.models import resolve_model

    for name in ("stable-diffusion", "mistral", "llava-next", "yolo-world", "clip"):
        resolve_model(f"ccsr-tiny/{name}")  # built here once, not by two ranks at once
    run_dir = tmp_path_factory.mktemp("one") / "giraffe"
    run_to_end(run_dir, 1, repo_root)
    return run_dir


@pytest.mark.slow
def test_two_processes_write_what_one_process_writes(tmp_path, repo_root, one_process):
    two = tmp_path / "two"
    run_to_end(two, 2, repo_root)
    expected, got = snapshot(one_process), snapshot(two)
    assert len(got["candidates.jsonl"]) == 9 and len(got["eval_jobs"]) == 8  # 3 prompts x 3; 2 x 2 x 2 scales
    for key in expected:
        assert got[key] == expected[key], key
    a, b = lora(one_process), lora(two)
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    # One writer of the run's records: no shard is left, the events say two processes.
    assert not list(two.rglob("*.rank-*.jsonl"))
    start = [e for e in read_jsonl(two / "events.jsonl") if e["event"] == "start"]
    assert [e["processes"] for e in start] == [2]
    assert json.loads((two / "iterations" / "001" / "eval.json").read_text())["gate"]


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


@pytest.mark.slow
def test_a_launch_that_builds_its_models_and_leaves_a_rank_without_prompts(tmp_path, repo_root):
    """A model cache of its own: the main process builds the embedded models (transformers writes weights
    only on rank 0, ultralytics runs a barrier on import); one prompt: rank 1 has no unit in three stages and
    never loads their models, yet takes part in every collective."""
    run_dir = tmp_path / "one-prompt"
    run_to_end(run_dir, 2, repo_root, "prompter.n_prompts=1", f"model_cache={tmp_path / 'models'}")
    assert len(read_jsonl(run_dir / "iterations" / "001" / "judgments.jsonl")) == 3
    from ccsr.models import model_path

    assert (model_path("ccsr-tiny/llava-next", tmp_path / "models") / "model.safetensors").is_file()


@pytest.mark.slow
def test_killed_two_process_run_finished_by_one_process(tmp_path, repo_root, one_process):
    """SIGKILL to the whole launch once a rank has committed a judged prompt of its own; one process then
    continues from every committed unit of both ranks."""
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        ccsr_run(run_dir, 2),
        cwd=repo_root,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    shard = run_dir / "iterations" / "001" / "judgments.rank-1.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not shard.exists():
        time.sleep(0.05)
    assert proc.poll() is None, "the launch ended before it could be killed"
    # The launcher and every process it started (the ranks are not all in its process group).
    family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    psutil.wait_procs([p for p in map(_process, family) if p is not None], timeout=60)
    shards = [p.name for p in run_dir.rglob("*.rank-*.jsonl")]
    assert "judgments.rank-1.jsonl" in shards  # killed mid-stage: the main process had not merged yet
    from ccsr.status import run_status

    # What the ranks committed counts as done for `ccsr status`, in its file or in a shard.
    it = run_status(run_dir)["iterations"][0]
    assert it["candidates"] == 9 and it["judged"] >= 3 and "judge" not in it["stages_done"]
    run_to_end(run_dir, 1, repo_root)
    expected, got = snapshot(one_process), snapshot(run_dir)
    for key in expected:
        assert got[key] == expected[key], key
    assert not list(run_dir.rglob("*.rank-*.jsonl")), shards
