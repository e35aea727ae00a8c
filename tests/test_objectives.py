"""A third objective is one new class and one entry in ``ccsr.train.TRAINERS``: defined here, registered for
the test, it passes config validation, trains the tiny SD through ``train_lora``, the loop's train stage and
``train_cli``, and has a fingerprint of its own."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ccsr import train
from ccsr.config import Config, ConfigError, TrainerConfig
from ccsr.config_files import save_config
from ccsr.trainer import LoRATrainer
from ccsr.training_data import TrainPair
from tests import helpers
from tests.helpers import lora_tensors, read_log

STEPS = 2


class DoubledFidelity(LoRATrainer):
    """sft with the fidelity term counted twice, logged under a name of its own."""

    nothing_to_train = "no pairs to double"

    def objective_log_names(self) -> list[str]:
        return ["doubled_fidelity"]

    def objective_loss(self, batch):
        term = 2.0 * self.denoising_loss(batch)
        return term, {"doubled_fidelity": term.detach().item()}


@pytest.fixture
def doubled(monkeypatch):
    monkeypatch.setitem(train.TRAINERS, "doubled", DoubledFidelity)


def make_cfg(objective: str) -> Config:
    cfg = helpers.make_cfg(
        "ccsr-tiny/stable-diffusion",
        objective=objective,
        resolution=32,
        batch_size=4,
        max_steps=STEPS,
        learning_rate=1e-3,
    )
    cfg.class_name = "giraffe"
    return cfg


def make_run(root: Path, cfg: Config, n_pairs: int = 4) -> Path:
    """A run directory as the loop leaves it after iteration 1's filter stage: config, images, pairs."""
    images = root / "iterations" / "001" / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    records = []
    for i in range(n_pairs):
        path = images / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
        record = {"prompt_id": f"p{i}", "index": 0, "prompt": f"a photo of a giraffe, scene {i}"}
        records.append({**record, "path": str(path.relative_to(root)), "score": 3.0, "confidence": 0.9})
    (root / "iterations" / "001" / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    save_config(cfg, root / "config.yaml")
    return root


def test_config_accepts_exactly_the_registered_objectives(doubled):
    assert TrainerConfig(objective="doubled").objective == "doubled"
    with pytest.raises(ConfigError, match="must be one of sft, dpo, doubled"):
        TrainerConfig(objective="ppo")


def test_the_objective_trains_with_its_own_term(doubled, tmp_path):
    run = make_run(tmp_path / "run", make_cfg("doubled"))
    pairs = [
        TrainPair(r["prompt"], run / r["path"])
        for r in map(json.loads, (run / "iterations/001/pairs.jsonl").read_text().splitlines())
    ]
    sft = train.train_lora(make_cfg("sft"), pairs, tmp_path / "sft")
    result = train.train_lora(make_cfg("doubled"), pairs, tmp_path / "doubled")

    log = read_log(result.lora_dir)
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    assert all(r["loss"] == r["doubled_fidelity"] for r in log)
    # Step 1 starts from the same weights and draws: the term is exactly twice sft's loss.
    assert log[0]["loss"] == pytest.approx(2 * read_log(sft.lora_dir)[0]["loss"], rel=1e-6)
    trained = lora_tensors(result.lora_dir)
    # peft starts lora_B at zero: a non-zero one is a trained LoRA, and not sft's.
    assert any(t.abs().max() > 0 for k, t in trained.items() if "lora.up" in k)
    assert helpers.max_diff(trained, lora_tensors(sft.lora_dir)) > 0
    fingerprints = {
        json.loads((d / "train_result.json").read_text())["fingerprint"]
        for d in (sft.lora_dir, result.lora_dir)
    }
    assert len(fingerprints) == 2


def test_the_loop_and_train_cli_reach_the_objective(doubled, tmp_path):
    from ccsr.loop import Loop
    from ccsr.rundir import RunDir, read_jsonl
    from ccsr.train_cli import train_iteration

    cfg = make_cfg("doubled")
    run = RunDir(make_run(tmp_path / "run", cfg))
    info = Loop(cfg, run).stage_train(1)
    assert info["steps"] == STEPS and info["pairs"] == 4 and "preferences" not in info
    assert "doubled_fidelity" in read_log(run.lora_dir(1))[0]
    # train_cli resolves the same job (the same fingerprint): it finds the finished LoRA.
    recorded = json.loads((run.lora_dir(1) / "train_result.json").read_text())
    assert train_iteration(run.root, 1).seconds == recorded["seconds"]
    # The objective's own reason for an iteration that brought nothing to train on.
    empty = RunDir(tmp_path / "empty")
    empty.files(1)["pairs"].parent.mkdir(parents=True)
    empty.files(1)["pairs"].write_text("")
    assert Loop(cfg, empty).stage_train(1) == {"skipped": True, "reason": "no pairs to double"}
    assert read_jsonl(empty.events_path)[-1]["reason"] == "no pairs to double"
