"""LoRA training in two processes (accelerate launch, gloo on the CPU) against one process on the same run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from ccsr.config import Config
from ccsr.config_files import save_config
from ccsr.distributed import shard
from ccsr.rundir import LORA_WEIGHTS_NAME
from tests.helpers import free_port

# 5 pairs, global batch 4, 2 epochs: step 1 splits 2 + 2, step 2 (the epoch's last sample) splits 0 + 1, so
# an empty share is exercised too.
N_PAIRS = 5
STEPS = 4


def make_run(root: Path, model: str) -> Path:
    """A run directory as the loop leaves it after iteration 1's filter stage: config, images, pairs."""
    images = root / "iterations" / "001" / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    records = []
    for i in range(N_PAIRS):
        path = images / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
        records.append(
            {
                "prompt_id": f"p{i}",
                "index": 0,
                "prompt": f"a photo of a giraffe, scene {i}",
                "path": str(path.relative_to(root)),
                "score": 3.0,
                "confidence": 0.9,
            }
        )
    (root / "iterations" / "001" / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = Config()
    cfg.class_name = "giraffe"
    cfg.device = "cpu"
    cfg.generator.model = model
    trainer = {
        "resolution": 32,
        "batch_size": 4,
        "max_steps": STEPS,
        "learning_rate": 1e-3,
        "checkpoint_every": 2,
    }
    for key, value in trainer.items():
        setattr(cfg.trainer, key, value)
    save_config(cfg, root / "config.yaml")
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The same run trained by `accelerate launch --multi_gpu --num_processes 2` and by one process."""
    from ccsr.models import resolve_model
    from ccsr.train_cli import train_iteration

    model = resolve_model("ccsr-tiny/stable-diffusion")  # built once here, not by two ranks at once
    root = tmp_path_factory.mktemp("multiprocess")
    two = make_run(root / "two", model)
    one = root / "one"
    shutil.copytree(two, one)

    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "YOLO_OFFLINE": "1",
    }
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.accelerate_cli",
        "launch",
        "--multi_gpu",  # with the trainer's Accelerator(cpu=True): two gloo ranks (`--cpu` would run one)
        "--num_processes=2",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        f"--main_process_port={free_port()}",
        "-m",
        "ccsr.train_cli",
        "--run-dir",
        str(two),
        "--iteration",
        "1",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    train_iteration(one, 1)
    return {"two": two, "one": one}


def lora(run: Path) -> dict:
    return load_file(str(run / "iterations" / "001" / "lora" / LORA_WEIGHTS_NAME))


def log(run: Path) -> list[dict]:
    path = run / "iterations" / "001" / "lora" / "train_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_shards_cover_the_global_batch_once():
    for size in range(0, 20):
        for processes in (1, 2, 3, 4):
            shards = [shard(size, processes, rank) for rank in range(processes)]
            assert [i for lo, hi in shards for i in range(lo, hi)] == list(range(size))
            assert max(hi - lo for lo, hi in shards) - min(hi - lo for lo, hi in shards) <= 1


def test_ranks_end_identical_and_match_one_process(runs):
    result = json.loads((runs["two"] / "iterations" / "001" / "lora" / "train_result.json").read_text())
    # Each rank hashed its own final adapter; the trainer gathered the digests (and raises if they differ).
    assert result["num_processes"] == 2
    assert len(result["rank_adapter_sha256"]) == 2
    assert len(set(result["rank_adapter_sha256"])) == 1

    two, one = lora(runs["two"]), lora(runs["one"])
    assert two.keys() == one.keys()
    # Same samples, draws and global-batch mean; only the float summation order differs. Measured 2.3e-6
    # after 4 Adam steps at lr 1e-3 (weights ~1): Adam's normalised update lifts ~1e-7 gradient noise on
    # near-zero gradients. (Without the gradient all-reduce the run fails earlier, in the rank check.)
    assert max((two[k] - one[k]).abs().max().item() for k in two) < 2e-5
    log_two, log_one = log(runs["two"]), log(runs["one"])
    assert [r["step"] for r in log_two] == list(range(1, STEPS + 1))  # written once, by the main process
    np.testing.assert_allclose([r["loss"] for r in log_two], [r["loss"] for r in log_one], rtol=1e-5)


def test_only_the_main_process_writes(runs):
    run = runs["two"]
    lora_dir = run / "iterations" / "001" / "lora"
    assert sorted(p.name for p in (lora_dir / "checkpoints").iterdir()) == ["step-2"]
    cache = run / "cache" / "encodings"
    assert len(list(cache.glob("latent-*.safetensors"))) == N_PAIRS
    assert len(list(cache.glob("text-*.safetensors"))) == N_PAIRS
    # No temp files of a second writer anywhere in the run.
    assert not [p for p in run.rglob(".*") if p.name != "run.lock"]
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert (events[0]["event"], events[0]["num_processes"]) == ("train_cli", 2)


def test_loop_reuses_the_launched_lora(runs):
    """The loop's train stage (same setup) finds the finished LoRA and returns at once."""
    from ccsr.train_cli import train_iteration

    recorded = json.loads((runs["two"] / "iterations" / "001" / "lora" / "train_result.json").read_text())
    again = train_iteration(runs["two"], 1)
    assert (again.steps, again.seconds) == (STEPS, recorded["seconds"])


def test_cli_errors_are_one_line(tmp_path, capsys):
    from ccsr.train_cli import main

    assert main(["--run-dir", str(tmp_path / "nowhere"), "--iteration", "1"]) == 2
    assert "has no config.yaml" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    save_config(Config(), run / "config.yaml")
    assert main(["--run-dir", str(run), "--iteration", "1"]) == 2
    err = capsys.readouterr().err
    assert "iteration 1 has no pairs.jsonl" in err and len(err.strip().splitlines()) == 1
    # Objective dpo reads the preference pairs: an iteration without any has nothing to train.
    cfg = Config()
    cfg.trainer.objective = "dpo"
    save_config(cfg, run / "config.yaml")
    assert main(["--run-dir", str(run), "--iteration", "1"]) == 2
    assert "iteration 1 has no preferences.jsonl" in capsys.readouterr().err
    (run / "iterations" / "001").mkdir(parents=True)
    (run / "iterations" / "001" / "preferences.jsonl").write_text("")
    assert main(["--run-dir", str(run), "--iteration", "1"]) == 2
    assert "no training preferences for iteration 1" in capsys.readouterr().err


def test_tensorboard_when_available(tmp_path):
    """TensorBoard (in the dev extra, optional for users): scalars go through accelerate's tracker when it is
    importable, and TensorBoard's own reader finds the loss of every step in the event file."""
    from accelerate.utils import is_tensorboard_available

    from ccsr.train import train_lora
    from ccsr.training_data import TrainPair

    if not is_tensorboard_available():
        pytest.skip("tensorboard / tensorboardX not installed (optional)")
    run = make_run(tmp_path / "run", "ccsr-tiny/stable-diffusion")
    pairs = [
        TrainPair(r["prompt"], run / r["path"])
        for r in map(json.loads, (run / "iterations/001/pairs.jsonl").read_text().splitlines())
    ]
    cfg = Config()
    cfg.device = "cpu"
    cfg.trainer.resolution, cfg.trainer.batch_size, cfg.trainer.max_steps = 32, 4, 2
    train_lora(cfg, pairs, tmp_path / "out")
    (events,) = (tmp_path / "out" / "tensorboard" / "lora").glob("events.out.tfevents.*")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    written = EventAccumulator(str(events))
    written.Reload()
    loss = written.Scalars("loss")
    assert [e.step for e in loss] == [1, 2] and all(e.value > 0 for e in loss)
