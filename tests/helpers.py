"""Helpers shared by the trainer tests (plain functions and classes, no fixtures)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import torch
from safetensors.torch import load_file

from ccsr.config import Config
from ccsr.rundir import LORA_WEIGHTS_NAME


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
