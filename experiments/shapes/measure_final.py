"""The proof's reported numbers: every final model draws the protocol's prompts at its seeds, and every image
is graded by the proof's evaluator (``experiments.shapes.evaluator``), an instrument that no loop role uses.

Each model draws the same (prompt, seed) pairs, so a model is compared with the base pair by pair
(``experiments.shapes.stats``). Images are saved as ``NN-SEED.png`` (NN the prompt's index in the plan) in one
folder per model, so grids can be redrawn and rows recomputed without drawing again.

Best-of-n is the loop's selection without the training: per (prompt, seed), n candidates from the base (the
base's own image and n - 1 more), the run's judge and detector pick one by the loop's rule
(``ccsr.selection``). It shows what the selection alone gains: the picks are what a LoRA of the loop is
trained to draw.
"""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from ccsr.config_files import resolve_data_path
from ccsr.roles import JudgeRequest
from experiments.shapes import evaluator, world

if TYPE_CHECKING:
    from PIL import Image

    from ccsr.config import Config

logger = logging.getLogger(__name__)

# The evaluator's grades (what is reported) and the loop measurement's lenient reading of the same image
# (world.measure: what the judge sees, for the differential-error check).
METRICS = (
    "exact",
    "colour",
    "count",
    "background",
    "present",
    "ring",
    "two_tone",
    "lenient_colour",
    "lenient_exact",
)
# Seeds of best-of-n's extra candidates: far from every protocol seed, distinct per (seed, candidate).
EXTRA_SEED_BASE = 10_000_000

Key = tuple[str, int]  # (prompt, seed)
Rows = dict[Key, dict[str, bool]]
Plan = list[tuple[str, list[int]]]  # (prompt, its seeds), in drawing order


def image_path(folder: Path, prompt_index: int, seed: int) -> Path:
    return folder / f"{prompt_index:02d}-{seed}.png"


def score_image(prompt: str, image: Image.Image) -> dict[str, bool]:
    """The per-image metrics of the protocol (``METRICS``)."""
    grade = evaluator.grade_image(prompt, image)
    spec = world.parse_caption(prompt)
    lenient = world.accuracy(spec, world.measure(image))
    row = {m: bool(grade[m]) for m in METRICS if not m.startswith("lenient_")}
    return row | {"lenient_colour": lenient.colour, "lenient_exact": lenient.exact}


def save_rows(rows: Rows, path: Path, plan: Plan) -> None:
    """One JSON line per image (prompt, seed, file, metrics), gzip-compressed: what every reported number of
    the model is recomputed from."""
    index = {p: i for i, (p, _) in enumerate(plan)}
    lines = [
        json.dumps({"prompt": p, "seed": s, "file": image_path(Path(), index[p], s).name} | m)
        for (p, s), m in sorted(rows.items(), key=lambda kv: (index[kv[0][0]], kv[0][1]))
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    # mtime 0: the same rows give the same bytes
    with gzip.GzipFile(path, "wb", mtime=0) as f:
        f.write(("\n".join(lines) + "\n").encode("utf-8"))


def draw_and_measure(
    cfg: Config, plan: Plan, folder: Path, lora: Path | None = None, scale: float = 1.0, label: str = ""
) -> Rows:
    """Every prompt of ``plan`` at each of its seeds, drawn with ``cfg``'s generator (``lora`` at ``scale``, or
    the base), saved into ``folder`` and graded."""
    from ccsr.backends import load_backend

    folder.mkdir(parents=True, exist_ok=True)
    generator = load_backend("generator", cfg)
    rows: Rows = {}
    for i, (prompt, seeds) in enumerate(plan):
        logger.info("%s: drawing %d images of %r (%d/%d)", label, len(seeds), prompt, i + 1, len(plan))
        images = generator.images([prompt] * len(seeds), seeds, lora=lora, scale=scale)
        for seed, image in zip(seeds, images, strict=True):
            image.save(image_path(folder, i, seed))
            rows[(prompt, seed)] = score_image(prompt, image)
    generator.close()
    return rows


# --------------------------------------------------------------------------------------------------------------
# best-of-n


class Picker:
    """The loop's pick among a prompt's candidates: the config's judge's eq. (1) score, the best-tied images to
    its detector, ``choose_image`` at ``filter.detection_threshold`` (ccsr.loop's judge and filter)."""

    def __init__(self, cfg: Config):
        from ccsr.backends import load_backend
        from ccsr.questions import QuestionSet

        self.cfg = cfg
        self.judge = load_backend("judge", cfg)
        self.detector = load_backend("detector", cfg)
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


def best_of_n(cfg: Config, plan: Plan, n: int, base_folder: Path, folder: Path) -> tuple[Rows, dict]:
    """Per prompt of ``plan`` (the first prompts of the base's plan, so indices match) and seed s: the base's
    own image (read from ``base_folder``) and n - 1 more drawn with seeds ``EXTRA_SEED_BASE + (n - 1) * s + j``;
    the pick (the base's image when none passes the detector) is saved into ``folder`` and graded. Returns the
    rows and how often each case happened."""
    from PIL import Image

    from ccsr.backends import load_backend

    folder.mkdir(parents=True, exist_ok=True)
    generator = load_backend("generator", cfg)
    pick = Picker(cfg)
    rows: Rows = {}
    info = {"candidates": n, "groups": sum(len(s) for _, s in plan), "base_image_picked": 0, "none_passed": 0}
    for i, (prompt, seeds) in enumerate(plan):
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
    return rows, info


# --------------------------------------------------------------------------------------------------------------
# the judge against the evaluator

# The questions whose truth the evaluator knows, and the grade each one asks about.
QUESTION_GRADES = {"Q3": "present", "Q4": "count", "Q5": "colour", "Q8": "background", "Q10": "exact"}


def judge_accuracy(cfg: Config, folder: Path, plan: Plan, rows: Rows) -> dict:
    """How often the config's judge answers the questions the evaluator can grade (``QUESTION_GRADES``) as the
    evaluator graded them (``rows``), on the images of ``plan`` drawn into ``folder``: overall and per
    question."""
    from PIL import Image

    from ccsr.backends import load_backend
    from ccsr.questions import QuestionSet

    questions = QuestionSet.load(resolve_data_path(cfg.judge.questions))
    judge = load_backend("judge", cfg)
    ids = questions.ids
    hits = {q: [] for q in QUESTION_GRADES}
    for i, (prompt, seeds) in enumerate(plan):
        images = [Image.open(image_path(folder, i, s)).convert("RGB") for s in seeds]
        request = JudgeRequest.rendered(questions, cfg.class_name, prompt)
        for seed, answer in zip(seeds, judge.answer(images, [request] * len(images)), strict=True):
            truth = rows[(prompt, seed)]
            # As the score reads them: a 'no' to Q3 makes Q4-Q7 'nan' (no class seen, so no count or colour
            # of it to be right), which grades as 'no'.
            effective = questions.apply_dependencies(list(answer.answers))
            for q, grade in QUESTION_GRADES.items():
                hits[q].append((effective[ids.index(q)] == "yes") == bool(truth[grade]))
    judge.close()
    every = [h for q in hits.values() for h in q]
    return {
        "accuracy": round(100.0 * sum(every) / len(every), 2),
        "per_question": {q: round(100.0 * sum(h) / len(h), 2) for q, h in hits.items()},
        "answers": len(every),
    }
