"""``make gpu-check``: one iteration of the real loop at the paper's model sizes, timed stage by stage.

    python -m benchmarks.gpu_check [--geometry paper|tiny] [--out runs/gpu-check] [--cache-dir DIR]

``--geometry paper`` (the default on a CUDA machine) builds every role of ``configs/paper.yaml`` at its real
size with random weights (``benchmarks.paper_models``: SD 2.1-base, Mistral-7B, LLaVA-1.6-Mistral-7B,
YOLO-World v2-s, CLIP ViT-L/14 and ViT-B/32), saves them once into a cache folder, then runs one iteration of
``ccsr.loop`` with the paper's backends and settings, except that the vLLM prompter is replaced by the transformers one and
the counts are small (``CHECK_COUNTS``): 8 prompts x 10 candidates at 512 px and 50 steps, the judge and the
detector on all of them, 100 LoRA steps at batch 18 in fp16, evaluation of 2 prompts x 1 seed at five scales.
Random weights cost the same FLOPs and memory as trained ones, so the timings are those of the real models.

``--geometry tiny`` (the default without CUDA) runs the same on the CPU with the embedded tiny models and tiny
counts, in well under two minutes; peak GPU memory is then null.

Two settings differ from the paper for the sake of random weights, neither changes the work per item: the
detector threshold is 0, so every prompt's best images pass (a random detector's confidence is arbitrary and
the train stage would otherwise have nothing to train on), and ``filter.top_k`` keeps several images per
prompt so that the few prompts give at least one full training batch. The prompter asks for one prompt per
completion, so that each call samples four completions (the batch a trained prompter's first calls have). The validation prompts are read from a
file (``validation.txt`` in the output folder) so that the evaluation's size does not depend on the prompter.

Writes ``<out>/results.json``::

    {"device": str, "geometry": "paper" | "tiny",
     "stages": {stage: {"seconds", "items", "items_per_s", "load_seconds", "peak_gpu_mb"}},
     "paper_iteration_minutes_estimate": float, "check_counts": {...}, "build_seconds": float}

Stage seconds are the loop's own (``stages.json`` of the run directory); ``load_seconds`` is the part spent in
the backends' constructors (model loading), timed in ``Loop.load``; ``peak_gpu_mb`` is
``torch.cuda.max_memory_allocated`` with the peak reset before each stage. The items of a stage: prompts
written, candidate images drawn, images judged, candidates filtered (judged images the filter chose among),
LoRA optimizer steps, evaluation images drawn (prompts x seeds x scales).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import fresh_loop
from ccsr.config import Config
from ccsr.config_files import load_config, shipped_file
from ccsr.devices import free_memory, torch_threads
from ccsr.loop import Loop
from ccsr.rundir import STAGES, RunDir, atomic_write_json

logger = logging.getLogger(__name__)

PAPER_CONFIG = shipped_file("configs/paper.yaml")
TINY_CONFIG = shipped_file("configs/tiny.yaml")
CLASS_NAME = "giraffe"
VALIDATION_PROMPTS = (
    "A tall giraffe standing in the savanna at sunset, golden hour light, 85mm lens.",
    "A giraffe eating leaves from an acacia tree, soft morning light, wildlife photograph.",
    "Two giraffes crossing a dusty road, wide shot, natural colors, high resolution.",
)

# Counts only: everything else comes from the geometry's config file.
CHECK_COUNTS = {
    "paper": {
        "n_prompts": 8,
        "n_validation": 2,
        "num_candidates": 10,
        "max_new_tokens": 256,  # a random LLM never writes </s>: every call decodes this many steps
        "top_k": 3,  # 8 prompts x 3 pairs >= one batch of 18
        "max_steps": 100,
        "seeds": [0],
    },
    "tiny": {
        "n_prompts": 3,
        "n_validation": 1,
        "num_candidates": 4,
        "max_new_tokens": 96,
        "top_k": 2,  # 3 prompts x 2 pairs >= one batch of 4
        "max_steps": 6,
        "seeds": [0],
    },
}
# config key -> role of benchmarks.paper_models (a .pt file inside the folder for the detector)
PAPER_ROLES = {
    "prompter.model": "mistral",
    "generator.model": "stable-diffusion",
    "judge.model": "llava-next",
    "detector.model": "yolo-world",
    "detector.text_model": "clip-vit-b-32",
    "evaluator.model": "clip-vit-l-14",
}


def default_cache_dir() -> Path:
    """Beside the embedded tiny models: ``$CCSR_CACHE/../ccsr-paper-random``."""
    from ccsr.models import default_cache_dir as tiny_cache

    return tiny_cache().parent / "ccsr-paper-random"


def build_paper_models(cache_dir: Path, device: str, dtype) -> dict[str, str]:
    """Every role at the paper's size, built once into ``cache_dir``; returns config key -> path."""
    from benchmarks.paper_models import BUILD_VERSION, YOLO_WORLD_FILE, build_paper_role
    from ccsr.models import build_once

    paths = {}
    for role in sorted(set(PAPER_ROLES.values())):
        start = time.perf_counter()
        out = cache_dir / f"{role}-v{BUILD_VERSION}"
        build_once(
            out, lambda folder, r=role: build_paper_role(r, folder, device=device, dtype=dtype), BUILD_VERSION
        )
        logger.info("%s ready in %s (%.1f s)", role, out, time.perf_counter() - start)
        paths[role] = str(out / YOLO_WORLD_FILE) if role == "yolo-world" else str(out)
    return {key: paths[role] for key, role in PAPER_ROLES.items()}


def check_config(geometry: str, out: Path, model_paths: dict[str, str] | None = None) -> Config:
    """The geometry's config (paper.yaml or tiny.yaml) with the check's counts and backends."""
    counts = CHECK_COUNTS[geometry]
    cfg = load_config(PAPER_CONFIG if geometry == "paper" else TINY_CONFIG, class_name=CLASS_NAME)
    cfg.iterations = 1
    cfg.offline = True
    if geometry == "paper":
        cfg.prompter.backend = "transformers"  # vLLM is not assumed on the machine
        cfg.judge.backend = "transformers"
        cfg.prompter.prompts_per_call = 1  # random text gives ~1 prompt per completion: 4 completions a call
    else:
        cfg.device = "cpu"  # the tiny geometry is the CPU check, even on a CUDA machine
    for key, path in (model_paths or {}).items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, path)
    validation = out / "validation.txt"
    validation.parent.mkdir(parents=True, exist_ok=True)
    validation.write_text("\n".join(VALIDATION_PROMPTS[: counts["n_validation"]]) + "\n", encoding="utf-8")
    cfg.prompter.validation_file = str(validation.resolve())
    cfg.prompter.n_prompts = counts["n_prompts"]
    cfg.prompter.n_validation = counts["n_validation"]
    cfg.prompter.max_new_tokens = counts["max_new_tokens"]
    cfg.generator.num_candidates = counts["num_candidates"]
    cfg.filter.top_k = counts["top_k"]
    cfg.filter.detection_threshold = 0.0
    cfg.trainer.max_steps = counts["max_steps"]
    cfg.evaluator.seeds = list(counts["seeds"])
    cfg.validate()
    return cfg


def _cuda(cfg: Config):
    """``torch.cuda`` when the run's models are on a CUDA device, else None (no GPU memory to measure)."""
    import torch

    from ccsr.devices import torch_device

    return torch.cuda if torch_device(cfg).type == "cuda" else None


@dataclass
class MeasuredLoop(Loop):
    """The loop, with the GPU memory peak and the backend-loading time of each stage recorded."""

    peak_gpu_mb: dict[str, float | None] = field(default_factory=dict)
    load_seconds: dict[str, float] = field(default_factory=dict)
    _stage: str | None = None

    def stages(self):
        return tuple((name, self._measured(name, work)) for name, work in super().stages())

    def _measured(self, name: str, work):
        def run(k: int) -> dict:
            cuda = _cuda(self.cfg)
            if cuda is not None:
                cuda.synchronize()
                cuda.reset_peak_memory_stats()
            self._stage = name
            self.load_seconds[name] = 0.0
            try:
                info = work(k)
            finally:
                self._stage = None
            if cuda is not None:
                cuda.synchronize()
                self.peak_gpu_mb[name] = round(cuda.max_memory_allocated() / 2**20, 1)
            else:
                self.peak_gpu_mb[name] = None
            return info

        return run

    def load(self, role: str):
        """Every backend the loop and its evaluation build, timed and charged to the current stage."""
        start = time.perf_counter()
        try:
            return super().load(role)
        finally:
            if self._stage is not None:
                self.load_seconds[self._stage] += time.perf_counter() - start


def stage_items(run: RunDir, k: int = 1) -> dict[str, int]:
    """Items per stage, from the run's own records (``stages.json``)."""
    done = run.stages_done(k)
    evaluated = 0
    eval_records = run.eval_dir(k) / "records.jsonl"
    if eval_records.is_file():
        evaluated = sum(1 for line in eval_records.read_text(encoding="utf-8").splitlines() if line.strip())
    return {
        "prompts": int(done["prompts"]["count"]),
        "candidates": int(done["candidates"]["count"]),
        "judge": int(done["judge"]["count"]),
        "filter": int(done["judge"]["count"]),
        "train": int(done["train"].get("steps", 0)),
        "eval": evaluated,
    }


def paper_counts(paper: Config) -> dict[str, float]:
    """Items per iteration at the paper's settings (``configs/paper.yaml``); prompts counts decode calls."""
    pc, gc, t, ev = paper.prompter, paper.generator, paper.trainer, paper.evaluator
    images = pc.n_prompts * gc.num_candidates
    pairs = pc.n_prompts  # at most one pair per prompt (top_k 1): an upper bound
    steps = t.max_steps or math.ceil(
        t.epochs * math.ceil(pairs / min(t.batch_size, pairs)) / t.gradient_accumulation_steps
    )
    scales = len({0.0, *map(float, ev.scales)})
    return {
        "prompts": prompter_calls(pc.n_prompts, pc.prompts_per_call)
        + prompter_calls(pc.n_validation, pc.prompts_per_call),
        "candidates": images,
        "judge": images,
        "filter": images,
        "train": steps,
        "eval": pc.n_validation * len(ev.seeds) * scales,
    }


def prompter_calls(n: int, per_completion: int, per_call: int = 4) -> int:
    """Calls of a trained prompter for ``n`` prompts: ``per_completion`` prompts per completion, at most
    ``per_call`` completions per call (``ccsr.prompter.MAX_SAMPLES_PER_CALL``)."""
    return math.ceil(math.ceil(n / per_completion) / per_call) if n > 0 else 0


def estimate_minutes(stages: dict[str, dict], attempts: int, check_tokens: int, paper: Config) -> float:
    """Minutes of one paper iteration, from the measured stages.

    For every stage but the prompts: ``load + (seconds - load) * paper_items / items``, the measured loading
    time paid once and the rest scaled by the item count (``paper_counts``: 1,000 images drawn, judged and
    filtered, ``epochs * ceil(pairs / batch)`` LoRA steps with one pair per prompt, which is an upper bound,
    and validation prompts x seeds x scales evaluation images). The train stage has no separate loading time,
    so its model load and latent cache are scaled with the steps (an overestimate of a few seconds per 100
    steps).

    Prompts: a random-weight LLM writes about one prompt per completion where a trained one writes
    ``prompts_per_call`` (10), so the prompt count is not the work. The work is decode steps: each call
    decodes ``max_new_tokens`` steps for its batch of at most 4 completions (a random model never stops early;
    a trained one stops at ``</s>``, so this is an upper bound). So: ``load + (seconds - load) / (attempts *
    check_tokens) * paper_calls * paper.max_new_tokens`` with ``paper_calls`` the calls a trained prompter
    needs for the iteration's and the validation prompts (``prompter_calls``).
    """
    counts = paper_counts(paper)
    total = 0.0
    for stage, s in stages.items():
        load, work = s["load_seconds"], max(s["seconds"] - s["load_seconds"], 0.0)
        if stage == "prompts":
            per_step = work / max(attempts * check_tokens, 1)
            total += load + per_step * counts["prompts"] * paper.prompter.max_new_tokens
        else:
            total += load + work * counts[stage] / max(s["items"], 1)
    return round(total / 60.0, 3)


def run_check(geometry: str, out: Path, cache_dir: Path | None = None) -> dict:
    """Build (paper) or resolve (tiny) the models, run one iteration, write and return ``results.json``."""
    import torch

    from ccsr.models import build_embedded

    out = Path(out)
    model_paths = None
    start = time.perf_counter()
    if geometry == "paper":
        if not torch.cuda.is_available():
            raise SystemExit("gpu-check: --geometry paper needs CUDA (use --geometry tiny on the CPU)")
        model_paths = build_paper_models(Path(cache_dir or default_cache_dir()), "cuda", torch.float16)
        free_memory()
    cfg = check_config(geometry, out, model_paths)
    build_embedded(cfg)  # built once, outside the timed run
    build_seconds = time.perf_counter() - start
    loop = fresh_loop(cfg, out / "run", MeasuredLoop)
    run = loop.run
    # The tiny models' ops are too small for a second thread; on a busy 2-core box two threads made this run
    # 15x slower (measured: 164 s against 11 s), so the CPU check runs on one (``ccsr.devices.torch_threads``).
    threads = torch_threads(1) if geometry == "tiny" else nullcontext()
    with threads:
        loop.run_iterations(1)
    done = run.stages_done(1)
    items = stage_items(run)
    stages = {}
    for stage in STAGES:
        seconds = float(done[stage]["seconds"])
        stages[stage] = {
            "seconds": seconds,
            "items": items[stage],
            "items_per_s": round(items[stage] / seconds, 4) if seconds > 0 else 0.0,
            "load_seconds": round(loop.load_seconds.get(stage, 0.0), 3),
            "peak_gpu_mb": loop.peak_gpu_mb.get(stage),
        }
    device = torch.cuda.get_device_name(0) if _cuda(cfg) is not None else "cpu"
    paper = load_config(PAPER_CONFIG, class_name=CLASS_NAME)
    attempts = int(done["prompts"].get("attempts", 1))
    results = {
        "device": device,
        "geometry": geometry,
        "stages": stages,
        "paper_iteration_minutes_estimate": estimate_minutes(
            stages, attempts, cfg.prompter.max_new_tokens, paper
        ),
        "check_counts": CHECK_COUNTS[geometry],
        "build_seconds": round(build_seconds, 3),  # building or finding the models, before the timed run
    }
    atomic_write_json(out / "results.json", results)
    return results


def main(argv: list[str] | None = None) -> int:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "YOLO_OFFLINE"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("YOLO_VERBOSE", "False")
    import torch

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--geometry", choices=("paper", "tiny"), default=None, help="paper on CUDA, else tiny"
    )
    parser.add_argument("--out", default="runs/gpu-check", help="output folder (results.json, run/)")
    parser.add_argument("--cache-dir", default=None, help="where the paper-size random models are saved")
    args = parser.parse_args(argv)
    geometry = args.geometry or ("paper" if torch.cuda.is_available() else "tiny")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    results = run_check(geometry, Path(args.out), Path(args.cache_dir) if args.cache_dir else None)
    print(json.dumps(results, indent=2))
    print(f"gpu-check: {geometry} geometry in {time.perf_counter() - start:.0f} s -> {args.out}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
