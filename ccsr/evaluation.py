"""The evaluation of an iteration's LoRA: held-out prompts x evaluator seeds x LoRA scales.

Paper section 4: CLIP score curves from LoRA scale 0 (the base model) to 1, and wins+ties against the base
per (prompt, seed) where a difference under 0.01 is a tie. CLIP score alone is a weak judge of alignment, so
the loop's own judge (eq. 1 score) and detector (detection rate) also score the evaluation images
(``evaluator.judge_and_detect``).

The generator, judge and detector are built by a ``load(role)`` hook: the loop passes its own ``Loop.load``, so
that everything the loop loads goes through one method; a caller without a loop gets ``load_backend``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ccsr.backends import load_backend
from ccsr.compat import pooled_output
from ccsr.console import bar
from ccsr.devices import free_memory, in_batches, keep_cpu_threads
from ccsr.distributed import Ranks, merge_shards, positions, shard_files
from ccsr.questions import load_question_set
from ccsr.records import EvalRecord, PromptRecord, read_records, write_records
from ccsr.roles import JudgeRequest
from ccsr.rundir import RunDir, atomic_save_image
from ccsr.seeds import derive_seed

if TYPE_CHECKING:
    from PIL import Image

    from ccsr.config import Config
    from ccsr.roles import Detector, Judge

# Builds the backend of a role ("generator", "judge", "detector").
Loader = Callable[[str], Any]


class CLIPScorer:
    """CLIP score = 100 * max(cos(image, text), 0) with a transformers ``CLIPModel``."""

    def __init__(self, cfg: Config):
        import torch
        from transformers import CLIPModel, CLIPProcessor

        from ccsr.devices import torch_device
        from ccsr.models import resolve_model

        path = resolve_model(cfg.evaluator.model, cfg.model_cache)
        self.device = torch_device(cfg)
        self.model = CLIPModel.from_pretrained(path).to(self.device).eval()
        self.processor = CLIPProcessor.from_pretrained(path)
        self._torch = torch

    def clip_scores(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        torch = self._torch
        inputs = self.processor(
            text=prompts, images=images, return_tensors="pt", padding=True, truncation=True, max_length=77
        ).to(self.device)
        with torch.inference_mode():
            img = pooled_output(self.model.get_image_features(pixel_values=inputs["pixel_values"]))
            txt = pooled_output(
                self.model.get_text_features(
                    input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
                )
            )
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        cos = (img * txt).sum(-1)
        return [round(float(100.0 * max(c, 0.0)), 6) for c in cos.tolist()]

    def close(self) -> None:
        del self.model


@dataclass
class WinTieLoss:
    wins: int
    ties: int
    losses: int

    @property
    def total(self) -> int:
        return self.wins + self.ties + self.losses

    @property
    def win_rate(self) -> float:
        return self.wins / self.total if self.total else 0.0

    @property
    def win_tie_rate(self) -> float:
        return (self.wins + self.ties) / self.total if self.total else 0.0


def win_tie_loss(scores: list[float], base: list[float], tie_band: float) -> WinTieLoss:
    """Compare per (prompt, seed); |difference| < tie_band is a tie (paper: 0.01)."""
    wins = ties = losses = 0
    for s, b in zip(scores, base, strict=True):
        if abs(s - b) < tie_band:
            ties += 1
        elif s > b:
            wins += 1
        else:
            losses += 1
    return WinTieLoss(wins, ties, losses)


def summarise(records: list[dict], scales: list[float], tie_band: float) -> dict:
    """``records``: one per (scale, prompt, seed) with ``clip_score``. Scale 0 is the base model."""
    by_scale: dict[float, dict[tuple, float]] = {}
    for r in records:
        by_scale.setdefault(float(r["scale"]), {})[(r["prompt_id"], r["seed"])] = r["clip_score"]
    keys = sorted(by_scale.get(0.0, {}))
    base = [by_scale[0.0][k] for k in keys]
    per_scale = {}
    extra: dict[float, list[dict]] = {}
    for r in records:
        extra.setdefault(float(r["scale"]), []).append(r)
    for scale in scales:
        scores = [by_scale[float(scale)][k] for k in keys]
        wtl = win_tie_loss(scores, base, tie_band)
        rows = extra.get(float(scale), [])
        more = {}
        if rows and all("judge_score" in r for r in rows):
            more["judge_score"] = round(sum(r["judge_score"] for r in rows) / len(rows), 4)
        if rows and all("detected" in r for r in rows):
            more["detection_rate"] = round(sum(bool(r["detected"]) for r in rows) / len(rows), 4)
        per_scale[f"{scale:g}"] = {
            **more,
            "clip_score": round(sum(scores) / len(scores), 4) if scores else None,
            "wins": wtl.wins,
            "ties": wtl.ties,
            "losses": wtl.losses,
            "win_rate": round(wtl.win_rate, 4),
            "win_tie_rate": round(wtl.win_tie_rate, 4),
        }
    nonzero = [s for s in scales if s > 0] or list(scales)
    # Best scale: highest win-rate against the base, then highest mean CLIP score.
    best = max(
        nonzero, key=lambda s: (per_scale[f"{s:g}"]["win_rate"], per_scale[f"{s:g}"]["clip_score"] or 0)
    )
    top = per_scale[f"{best:g}"]
    return {
        "best_scale": best,
        "win_rate": top["win_rate"],
        "win_tie_rate": top["win_tie_rate"],
        "wins": top["wins"],
        "ties": top["ties"],
        "losses": top["losses"],
        "clip_score_by_scale": {k: v["clip_score"] for k, v in per_scale.items()},
        "by_scale": per_scale,
        "n_images_per_scale": len(keys),
        "tie_band": tie_band,
    }


# --- the procedure ----------------------------------------------------------------------------------------


def evaluate(
    cfg: Config,
    run: RunDir,
    k: int,
    scales: list[float],
    eval_dir: Path,
    on_scale: Callable[[float], None] | None = None,
    ranks: Ranks | None = None,
    load: Loader | None = None,
) -> dict | None:
    """Iteration k's LoRA on the run's held-out prompts x ``cfg.evaluator.seeds`` at each of ``scales`` (scale
    0, the base model, is always added: win/tie/loss needs it).

    Writes the images and ``records.jsonl`` (``EvalRecord``) under ``eval_dir`` and returns the summary (no
    gate decision). ``on_scale`` is called before each scale is drawn (the loop's heartbeat and stop check).
    ``load`` builds the generator, judge and detector (default: ``load_backend`` with ``cfg``); the CLIP
    scorer is the evaluation's own.

    The work is cut into units of ``evaluator.unit_size`` (held-out prompt, seed) jobs at one scale, and every
    model sees one unit at a time, so a unit's figures do not depend on the others. Under a launcher each rank
    does every ``world``-th unit; the main process merges the records and returns the summary, the others
    return None.
    """
    ranks = ranks or Ranks()
    load = load or partial(load_backend, cfg=cfg)
    lora = run.lora_dir(k)
    ec = cfg.evaluator
    scales = sorted({0.0, *map(float, scales)})
    records_path = eval_dir / "records.jsonl"
    if ranks.is_main:
        for stale in shard_files(records_path):  # an earlier, interrupted evaluation's
            stale.unlink()
    jobs = _jobs(cfg, run)
    size = max(1, cfg.evaluator.unit_size or cfg.generator.batch_size)
    chunks = ranks.mine([jobs[i : i + size] for i in range(0, len(jobs), size)])
    with keep_cpu_threads():
        units = _draw(cfg, run, k, scales, chunks, eval_dir, on_scale, load)
        images = [[open_image(run, r.path) for r in unit] for unit in units]
        scorer = CLIPScorer(cfg)
        for unit, imgs in zip(units, images, strict=True):
            scores = in_batches(
                lambda c: scorer.clip_scores(imgs[c], [r.prompt for r in unit[c]]),  # noqa: B023
                len(unit),
                ec.batch_size,
                "CLIP score",
            )
            for r, score in zip(unit, scores, strict=True):
                r.clip_score = score
        scorer.close()
        free_memory()  # the CLIP scorer's memory back before the judge (vLLM checks free memory)
        if ec.judge_and_detect:
            judge_and_detect(cfg, units, images, load)
    write_records(ranks.shard_path(records_path), [r for unit in units for r in unit])
    ranks.barrier()  # every rank's records are written
    if not ranks.is_main:
        return None
    scale_order = positions(scales)
    job_order = positions((v.id, s) for v, s in jobs)
    records = merge_shards(
        records_path,
        EvalRecord,
        key=lambda r: (r.scale, r.prompt_id, r.seed),
        order=lambda r: (scale_order[r.scale], job_order[(r.prompt_id, r.seed)]),
    )
    summary = summarise([r.to_dict() for r in records], scales, ec.tie_band)
    summary["lora"] = str(lora.relative_to(run.root))
    return summary


def _jobs(cfg: Config, run: RunDir) -> list[tuple[PromptRecord, int]]:
    """The (held-out prompt, evaluator seed) pairs, in the order of the records."""
    return [
        (v, seed) for v in read_records(run.validation_path, PromptRecord) for seed in cfg.evaluator.seeds
    ]


def _draw(
    cfg: Config,
    run: RunDir,
    k: int,
    scales: list[float],
    chunks: list[list],
    eval_dir: Path,
    on_scale,
    load: Loader,
) -> list[list[EvalRecord]]:
    """The evaluation images of ``chunks`` at every scale, one unit per (scale, chunk); the generator loaded
    once and the LoRA once, scales switched. ``on_scale`` is called on every rank, whatever its share."""
    lora = run.lora_dir(k)
    units = []
    generator = load("generator")
    for scale in bar(scales, desc=f"iteration {k} · eval", unit="scale"):
        if on_scale is not None:
            on_scale(scale)
        for chunk in chunks:
            # The same seeds at every scale, so scale 0 is exactly the base model's image.
            seeds = [derive_seed(cfg.seed, "eval", v.id, s) for v, s in chunk]
            images = generator.images([v.prompt for v, _ in chunk], seeds, lora=lora, scale=scale)
            unit = []
            for (v, s), seed, image in zip(chunk, seeds, images, strict=True):
                path = eval_dir / f"scale-{scale:g}" / f"{v.id}-s{s}.png"
                run.inside(path)  # a prompt id is data: it names a file inside the run only
                atomic_save_image(path, image)
                unit.append(EvalRecord(v.id, v.prompt, s, seed, scale, str(path.relative_to(run.root))))
            units.append(unit)
    generator.close()
    del generator
    free_memory()
    return units


def open_image(run: RunDir, rel_path: str) -> Image.Image:
    """A run's image (``rel_path`` as its records hold it: relative to the run directory), as RGB."""
    from PIL import Image

    return Image.open(run.inside(run.root / rel_path)).convert("RGB")


def _judge_scores(
    cfg: Config, units: list[list[EvalRecord]], images: list[list], load: Loader
) -> list[list[int]]:
    """The loop's judge on the evaluation images, unit by unit, ``judge.batch_size`` at a time; freed after."""
    questions = load_question_set(cfg.judge.questions)
    judge: Judge = load("judge")
    out = []
    for unit, imgs in zip(units, images, strict=True):
        requests = [JudgeRequest.rendered(questions, cfg.class_name, r.prompt) for r in unit]
        results = in_batches(
            lambda c: judge.answer(imgs[c], requests[c]),  # noqa: B023 (called at once)
            len(unit),
            cfg.judge.batch_size,
            "judge",
        )
        out.append([questions.score(questions.apply_dependencies(res.answers)) for res in results])
    judge.close()
    return out


def judge_and_detect(
    cfg: Config, units: list[list[EvalRecord]], images: list[list], load: Loader | None = None
) -> None:
    """The loop's judge (eq. 1 score) and detector (confidence, detected at the threshold) on eval images,
    unit by unit (``evaluate``); ``load`` as there."""
    load = load or partial(load_backend, cfg=cfg)
    for unit, scores in zip(units, _judge_scores(cfg, units, images, load), strict=True):
        for r, score in zip(unit, scores, strict=True):
            r.judge_score = score
    free_memory()
    detector: Detector = load("detector")
    for unit, imgs in zip(units, images, strict=True):
        confidences = in_batches(
            lambda c: detector.confidence(imgs[c], cfg.class_name),  # noqa: B023 (called at once)
            len(unit),
            cfg.detector.batch_size,
            "detector",
        )
        for r, c in zip(unit, confidences, strict=True):
            r.confidence = round(float(c), 6)
            r.detected = bool(c >= cfg.filter.detection_threshold)
    detector.close()
