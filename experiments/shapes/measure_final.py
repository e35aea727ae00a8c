"""The proof's reported numbers: every final model draws the target prompts at the protocol's seeds, and
every image is measured against the world's ground truth.

Each model draws the same (prompt, seed) pairs, so a model is compared with the base pair by pair: the mean
per-pair difference and its paired bootstrap interval. Images are saved as ``NN-SEED.png`` (NN the target
prompt's index) in one folder per model, so grids can be redrawn without drawing again.

Best-of-n is the loop's selection without the training: per (prompt, seed), n candidates from the base (the
base's own image and n - 1 more), the measuring judge and detector pick one by the paper's rule
(``ccsr.selection``). It shows what the selection alone gains: the picks are what a LoRA of the loop is
trained to draw.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ccsr.config_files import resolve_data_path
from ccsr.roles import JudgeRequest
from experiments.shapes import world
from experiments.shapes.calibrate import any_shape_colour

if TYPE_CHECKING:
    from PIL import Image

    from ccsr.config import Config

logger = logging.getLogger(__name__)

PRIMARY = "colour"  # world.accuracy(...).colour: at least one circle measured, every circle in the colour
SECONDARY = ("count", "exact", "any_shape_colour")
METRICS = (PRIMARY, *SECONDARY)
BOOTSTRAP_DRAWS = 2000
BOOTSTRAP_SEED = 0
# Seeds of best-of-n's extra candidates: far from every protocol seed, distinct per (seed, candidate).
EXTRA_SEED_BASE = 10_000_000

Key = tuple[str, int]  # (prompt, seed)
Rows = dict[Key, dict[str, bool]]


def image_path(folder: Path, prompt_index: int, seed: int) -> Path:
    return folder / f"{prompt_index:02d}-{seed}.png"


def score_image(prompt: str, image: Image.Image) -> dict[str, bool]:
    """The per-image metrics of the protocol: colour (primary), count, exact, any_shape_colour."""
    spec = world.parse_caption(prompt)
    if spec is None:
        raise ValueError(f"prompt {prompt!r} is not a caption of the shapes grammar")
    m = world.measure(image)
    acc = world.accuracy(spec, m)
    return {
        "colour": acc.colour,
        "count": acc.count,
        "exact": acc.exact,
        "any_shape_colour": any_shape_colour(spec, m),
    }


def save_rows(rows: Rows, folder: Path, prompts: list[str]) -> None:
    """``rows.jsonl`` next to the images: one line per image with its metrics."""
    import json

    index = {p: i for i, p in enumerate(prompts)}
    lines = [
        json.dumps({"prompt": p, "seed": s, "file": image_path(folder, index[p], s).name} | m)
        for (p, s), m in sorted(rows.items(), key=lambda kv: (index[kv[0][0]], kv[0][1]))
    ]
    (folder / "rows.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def draw_and_measure(
    cfg: Config,
    prompts: list[str],
    seeds: Iterable[int],
    folder: Path,
    lora: Path | None = None,
    scale: float = 1.0,
    label: str = "",
) -> Rows:
    """Every prompt x every seed drawn with ``cfg``'s generator (``lora`` at ``scale``, or the base), saved
    into ``folder`` and measured."""
    from ccsr.backends import load_backend

    seeds = list(seeds)
    folder.mkdir(parents=True, exist_ok=True)
    generator = load_backend("generator", cfg)
    rows: Rows = {}
    for i, prompt in enumerate(prompts):
        logger.info("%s: drawing %d images of %r (%d/%d)", label, len(seeds), prompt, i + 1, len(prompts))
        images = generator.images([prompt] * len(seeds), seeds, lora=lora, scale=scale)
        for seed, image in zip(seeds, images, strict=True):
            image.save(image_path(folder, i, seed))
            rows[(prompt, seed)] = score_image(prompt, image)
    generator.close()
    save_rows(rows, folder, prompts)
    return rows


# --------------------------------------------------------------------------------------------------------------
# best-of-n


class Picker:
    """The loop's pick among a prompt's candidates: the measuring judge's eq. (1) score, the best-tied images
    to the measuring detector, ``choose_image`` at ``filter.detection_threshold`` (ccsr.loop's judge and filter)."""

    def __init__(self, cfg: Config):
        from ccsr.questions import QuestionSet
        from experiments.shapes.backends import MeasuringDetector, MeasuringJudge

        self.cfg = cfg
        self.judge = MeasuringJudge(cfg)
        self.detector = MeasuringDetector(cfg)
        self.questions = QuestionSet.load(resolve_data_path(cfg.judge.questions))

    def __call__(self, prompt: str, images: list[Image.Image]) -> int | None:
        """The index of the picked image, or None when no best-tied image passes the detector."""
        from ccsr.records import Detection, Judgment
        from ccsr.selection import best_tied, choose_image

        request = JudgeRequest.rendered(self.questions, self.cfg.class_name, prompt)
        judgments = []
        for index, answer in enumerate(self.judge.answer(images, [request] * len(images))):
            answers = self.questions.apply_dependencies(answer.answers)
            judgments.append(Judgment("p", index, answers, self.questions.score(answers), answer.p_yes))
        tied = best_tied(judgments, self.cfg.filter.tie_break, self.questions)
        confidences = self.detector.confidence([images[j.index] for j in tied], self.cfg.class_name)
        detections = [
            Detection("p", j.index, j.score, round(float(c), 6))
            for j, c in zip(tied, confidences, strict=True)
        ]
        choice = choose_image(detections, self.cfg.filter.detection_threshold)
        return None if choice.detection is None else choice.detection.index


def best_of_n(
    cfg: Config, prompts: list[str], seeds: list[int], n: int, base_folder: Path, folder: Path
) -> tuple[Rows, dict]:
    """Per prompt and seed s: the base's own image (read from ``base_folder``) and n - 1 more drawn with seeds
    ``EXTRA_SEED_BASE + (n - 1) * s + j``; the pick (the base's image when none passes the detector) is saved
    into ``folder`` and measured. Returns the rows and how often each case happened."""
    from PIL import Image

    from ccsr.backends import load_backend

    folder.mkdir(parents=True, exist_ok=True)
    generator = load_backend("generator", cfg)
    pick = Picker(cfg)
    rows: Rows = {}
    info = {"candidates": n, "groups": len(prompts) * len(seeds), "base_image_picked": 0, "none_passed": 0}
    for i, prompt in enumerate(prompts):
        logger.info("best-of-%d: %d candidates for each of %d seeds of %r", n, n, len(seeds), prompt)
        extra = [EXTRA_SEED_BASE + (n - 1) * s + j for s in seeds for j in range(n - 1)]
        drawn = generator.images([prompt] * len(extra), extra)
        for g, seed in enumerate(seeds):
            own = Image.open(image_path(base_folder, i, seed)).convert("RGB")
            candidates = [own, *drawn[g * (n - 1) : (g + 1) * (n - 1)]]
            index = pick(prompt, candidates)
            info["none_passed"] += index is None
            info["base_image_picked"] += index in (None, 0)
            chosen = candidates[index or 0]
            chosen.save(image_path(folder, i, seed))
            rows[(prompt, seed)] = score_image(prompt, chosen)
    generator.close()
    save_rows(rows, folder, prompts)
    return rows, info


# --------------------------------------------------------------------------------------------------------------
# against the base


def bootstrap_ci(diffs: np.ndarray) -> tuple[float, float]:
    """95% interval of the mean of paired differences: ``BOOTSTRAP_DRAWS`` resamples of the pairs."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    means = diffs[rng.integers(0, len(diffs), (BOOTSTRAP_DRAWS, len(diffs)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def versus_base(rows: Rows, base: Rows, metric: str) -> dict:
    """One metric of a model against the base's images of the same (prompt, seed), in percentage points."""
    keys = sorted(rows)
    x = np.array([rows[k][metric] for k in keys], dtype=np.float64) * 100
    b = np.array([base[k][metric] for k in keys], dtype=np.float64) * 100
    lo, hi = bootstrap_ci(x - b)
    return {
        "value": round(float(x.mean()), 2),
        "base_value": round(float(b.mean()), 2),
        "delta_vs_base": round(float((x - b).mean()), 2),
        "ci95": [round(lo, 2), round(hi, 2)],
        "images": len(keys),
    }


def compare(rows: Rows, base: Rows) -> dict:
    """The primary metric (``final``) and the secondary ones of a model against the base."""
    return {
        "final": versus_base(rows, base, PRIMARY),
        "secondary": {m: versus_base(rows, base, m) for m in SECONDARY},
    }
