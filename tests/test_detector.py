"""YoloWorldDetector on the tiny YOLO-World + tiny CLIP, scoring images from the tiny SD pipeline."""

from __future__ import annotations

import socket

import pytest
import torch

from ccsr.config import Config
from ccsr.detector import YoloWorldDetector, find_model_file
from ccsr.models import resolve_model

THRESHOLD = 0.6  # paper section 3.3


@pytest.fixture(scope="module")
def cfg(tiny_cache) -> Config:
    cfg = Config(device="cpu", model_cache=str(tiny_cache))
    cfg.detector.image_size = 64  # as in configs/tiny.yaml, where the tiny detector is calibrated
    return cfg


@pytest.fixture(scope="module")
def images(tiny_cache):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(resolve_model("ccsr-tiny/stable-diffusion", tiny_cache))
    pipe.set_progress_bar_config(disable=True)
    out = []
    for size, n in ((64, 12), (128, 4)):
        generators = [torch.Generator().manual_seed(500 + size + i) for i in range(n)]
        prompts = ["a giraffe near an elephant"] * n
        out += pipe(prompts, height=size, width=size, num_inference_steps=10, generator=generators).images
    return out


@pytest.fixture(scope="module")
def detector(cfg, monkeypatch_module):
    # Build (if needed) before the network guard, then load and run with every connection refused.
    resolve_model(cfg.detector.model, cfg.model_cache)
    resolve_model(cfg.detector.text_model, cfg.model_cache)

    def refuse(*args, **kwargs):
        raise OSError("network access attempted during a test")

    monkeypatch_module.setattr(socket.socket, "connect", refuse)
    monkeypatch_module.setattr(socket, "create_connection", refuse)
    det = YoloWorldDetector(cfg)
    yield det
    det.close()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.mark.parametrize("class_name", ["giraffe", "elephant"])
def test_some_images_pass_and_some_do_not(detector, images, class_name):
    conf = detector.confidence(images, class_name)
    assert len(conf) == len(images)
    assert all(isinstance(c, float) and 0.0 <= c <= 1.0 for c in conf)
    passed = sum(c >= THRESHOLD for c in conf)
    assert 0.15 * len(images) <= passed <= 0.85 * len(images), conf


def test_confidence_is_deterministic_and_batch_independent(detector, images):
    batch = detector.confidence(images[:6], "giraffe")
    assert detector.confidence(images[:6], "giraffe") == batch
    detector.confidence(images[:2], "elephant")  # switching class and back changes nothing
    single = [detector.confidence([im], "giraffe")[0] for im in images[:3]]
    assert single == pytest.approx(batch[:3], abs=1e-5)


def test_class_changes_the_confidence(detector, images):
    assert detector.confidence(images[:6], "giraffe") != detector.confidence(images[:6], "a red bicycle")


def test_empty_batch(detector):
    assert detector.confidence([], "giraffe") == []


def test_model_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="one .pt"):
        find_model_file(tmp_path)
    (tmp_path / "a.pt").write_bytes(b"")
    assert find_model_file(tmp_path) == tmp_path / "a.pt"
    assert find_model_file(tmp_path / "a.pt") == tmp_path / "a.pt"
    with pytest.raises(FileNotFoundError, match="local path"):
        find_model_file(tmp_path / "missing.pt")
