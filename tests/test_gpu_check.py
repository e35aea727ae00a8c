"""``python -m benchmarks.gpu_check``: the tiny path end to end, the paper geometry's sizes, the estimate's arithmetic."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.gpu_check import PAPER_CONFIG, estimate_minutes, paper_counts
from ccsr.config_files import load_config
from ccsr.rundir import STAGES
from tests.helpers import assert_offline, run_guarded


@pytest.mark.slow
def test_tiny_geometry_writes_results(tmp_path):
    """``python -m benchmarks.gpu_check`` without CUDA: the tiny path, no network access (the offline guard
    of tests/helpers.py), and results.json in the documented schema."""
    out = tmp_path / "gpu-check"
    proc, events = run_guarded(
        tmp_path,
        "benchmarks.gpu_check",
        ["--out", str(out)],
        timeout=300,
        env={"CUDA_VISIBLE_DEVICES": ""},  # the default geometry without CUDA, even on a GPU machine
    )
    assert_offline(proc, events)
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["geometry"] == "tiny"
    assert results["device"] == "cpu"
    assert list(results["stages"]) == list(STAGES)
    for stage, s in results["stages"].items():
        assert isinstance(s["seconds"], float) and s["seconds"] > 0, stage
        assert isinstance(s["items_per_s"], float) and s["items_per_s"] > 0, stage
        assert s["peak_gpu_mb"] is None, stage
        assert 0 <= s["load_seconds"] <= s["seconds"], stage
    counts = results["check_counts"]
    assert results["stages"]["candidates"]["items"] == counts["n_prompts"] * counts["num_candidates"]
    assert results["stages"]["train"]["items"] == counts["max_steps"]
    assert results["stages"]["eval"]["items"] == counts["n_validation"] * len(counts["seeds"]) * 5
    estimate = results["paper_iteration_minutes_estimate"]
    assert isinstance(estimate, float) and estimate > 0 and math.isfinite(estimate)


# (part, low, high) in parameters: the published sizes of SD 2.1-base (UNet 865.9 M, VAE 83.7 M, OpenCLIP-H
# text tower 340 M), Mistral-7B (7.24 B), LLaVA-1.6-Mistral-7B (7.57 B), CLIP ViT-L/14 (428 M), ViT-B/32 (151 M).
PAPER_SIZES = (
    ("unet", 860e6, 870e6),
    ("vae", 83e6, 84.5e6),
    ("text-encoder", 335e6, 345e6),
    ("mistral", 7.2e9, 7.3e9),
    ("llava-next", 7.5e9, 7.65e9),
    ("clip-vit-l-14", 420e6, 435e6),
    ("clip-vit-b-32", 149e6, 153e6),
)


def parameter_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_paper_geometry_parameter_counts():
    """The config dicts of ``benchmarks.paper_models`` on the meta device: nothing allocated, sizes as
    published."""
    import torch

    from benchmarks.paper_models import paper_model, yolo_world_model

    for part, low, high in PAPER_SIZES:
        with torch.device("meta"):
            model = paper_model(part)
        assert all(p.device.type == "meta" for p in model.parameters()), part
        assert low <= parameter_count(model) <= high, (part, parameter_count(model))
    # YOLO-World v2-s from ultralytics' yaml (13 M, small enough to build for real).
    assert 12e6 <= parameter_count(yolo_world_model().model) <= 14e6


def test_paper_geometry_token_ids_fit():
    """The project's tokenizers produce ids inside the paper-size models' vocabularies."""
    from benchmarks.paper_models import CLIP_VIT_L14, LLAVA_16_MISTRAL, MISTRAL_7B, OPENCLIP_H_TEXT
    from ccsr.tiny.llava import IMAGE_TOKEN
    from ccsr.tiny.sd import build_clip_tokenizer
    from ccsr.tiny.tokenizer import build_tokenizer

    assert len(build_tokenizer()) <= MISTRAL_7B["vocab_size"]
    assert len(build_tokenizer(extra_special=[IMAGE_TOKEN])) <= LLAVA_16_MISTRAL["text_config"]["vocab_size"]
    clip = len(build_clip_tokenizer())
    assert clip <= OPENCLIP_H_TEXT["vocab_size"] and clip <= CLIP_VIT_L14["text_config"]["vocab_size"]


def test_paper_counts_and_estimate_arithmetic():
    paper = load_config(PAPER_CONFIG, class_name="giraffe")
    counts = paper_counts(paper)
    # 100 prompts x 10 candidates; 100 epochs x ceil(100 pairs / 18); 50 prompts x 4 seeds x 5 scales;
    # a trained prompter writes 10 prompts per completion, 4 completions per call: 3 + 2 calls.
    assert counts == {
        "prompts": 5,
        "candidates": 1000,
        "judge": 1000,
        "filter": 1000,
        "train": 600,
        "eval": 1000,
    }
    stages = {
        # 2 calls of 256 tokens in 12 s after a 10 s load: 5 calls of 1024 tokens take 120 s.
        "prompts": {"seconds": 22.0, "load_seconds": 10.0, "items": 8},
        "candidates": {"seconds": 18.0, "load_seconds": 2.0, "items": 80},  # 2 + 16 * 12.5 = 202
        "judge": {"seconds": 30.0, "load_seconds": 14.0, "items": 80},  # 14 + 16 * 12.5 = 214
        "filter": {"seconds": 1.6, "load_seconds": 0.0, "items": 80},  # 20
        "train": {"seconds": 20.0, "load_seconds": 0.0, "items": 100},  # 120
        "eval": {"seconds": 40.0, "load_seconds": 30.0, "items": 10},  # 30 + 10 * 100 = 1030
    }
    expected = (10 + 120 + 202 + 214 + 20 + 120 + 1030) / 60
    assert estimate_minutes(stages, attempts=2, check_tokens=256, paper=paper) == pytest.approx(
        expected, abs=1e-3
    )


def test_paper_check_config_keeps_the_paper_settings(tmp_path):
    """The paper geometry's run: paper.yaml's settings, transformers backends, only the counts scaled."""
    from benchmarks.gpu_check import PAPER_ROLES, check_config

    paths = {key: f"/models/{role}" for key, role in PAPER_ROLES.items()}
    cfg = check_config("paper", tmp_path, paths)
    assert (cfg.prompter.backend, cfg.judge.backend) == ("transformers", "transformers")
    assert (cfg.device, cfg.dtype) == ("cuda", "float16")
    assert cfg.prompter.n_prompts == 8 and cfg.generator.num_candidates == 10
    assert (cfg.generator.resolution, cfg.generator.steps, cfg.generator.guidance_scale) == (512, 50, 7.5)
    t = cfg.trainer
    assert (t.max_steps, t.batch_size, t.mixed_precision, t.resolution, t.rank) == (100, 18, "fp16", 512, 4)
    assert cfg.evaluator.scales == [0.0, 0.2, 0.4, 0.7, 1.0]
    assert cfg.judge.model == "/models/llava-next" and cfg.evaluator.model == "/models/clip-vit-l-14"
    validation = (tmp_path / "validation.txt").read_text(encoding="utf-8").splitlines()
    assert len(validation) == cfg.prompter.n_validation == 2
    # 8 prompts x top_k 3 can fill one batch of 18.
    assert cfg.prompter.n_prompts * cfg.filter.top_k >= t.batch_size
