"""Role backends of the shapes world: a grammar prompter, a measuring judge, a measuring detector.

They implement the same ``ccsr.roles`` protocols as the LLM, VLM and YOLO-World backends and a config names
them by import path (``judge.backend: experiments.shapes.backends:MeasuringJudge``, see
``configs/shapes.yaml``), so the loop, its run directory, the trainer, the evaluation and the gate run
unchanged on this world.

The judge answers the world's version of the ten questions (``prompts/questions_shapes.yaml``) by measuring
the image against the class and the prompt of its ``JudgeRequest``; polarities, the Q3 dependency and eq. (1)
scoring stay the loop's (``ccsr.questions.QuestionSet``).
"""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING

from ccsr.config_files import resolve_data_path
from ccsr.questions import QuestionSet
from ccsr.roles import JudgeAnswer, JudgeRequest
from experiments.shapes import world

if TYPE_CHECKING:
    from PIL import Image

    from ccsr.config import Config

logger = logging.getLogger(__name__)


def _class_of(cfg: Config) -> str:
    name = (cfg.class_name or "").strip().lower()
    if name not in world.CLASSES:
        raise ValueError(f"the shapes world draws {', '.join(world.CLASSES)}; got class {cfg.class_name!r}")
    return name


class GrammarPrompter:
    """Samples captions of the run's class from the world's grammar, as a numbered list like an LLM's.

    Held-out combinations (``world.is_held_out``) are never sampled: the proof's target prompts are drawn
    from them (``experiments.shapes.protocol``).
    """

    model_keys = ()  # loads no model

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.shape = _class_of(cfg)

    def sample(self, messages: list[dict[str, str]], num: int, seed: int) -> list[str]:
        out = []
        for sample in range(num):
            rng = random.Random(f"grammar:{self.shape}:{seed + sample}")  # sample i's seed, as vLLM gives it
            captions = world.sample_captions(self.shape, self.cfg.prompter.prompts_per_call, rng)
            out.append("\n".join(f"{i}. {c}" for i, c in enumerate(captions, 1)))
        return out

    def close(self) -> None:
        pass


# The checks behind the ten questions, by question id. Each gets (spec, measurement, class) and says yes/no.
def _q1_flat(spec, m, shape):  # clean flat colours on a plain background
    return m.unknown_fraction < 0.05


def _q2_stray_marks(spec, m, shape):  # specks or blobs that are no shape of the world
    return m.specks > 0 or any(o.shape is None for o in m.objects)


def _q3_present(spec, m, shape):
    return bool(m.of_shape(shape))


def _q4_count(spec, m, shape):
    return spec is not None and len(m.of_shape(shape)) == spec.count


def _q5_colour(spec, m, shape):
    return spec is not None and all(o.colour == spec.colour for o in m.of_shape(shape))


def _q6_other_shapes(spec, m, shape):
    return any(o.shape is not None and o.shape != shape for o in m.objects)


def _q7_well_formed(spec, m, shape):
    return all(o.class_confidence[shape] >= 0.6 for o in m.of_shape(shape))


def _q8_background(spec, m, shape):
    return spec is not None and m.background == spec.background


def _q9_other_colours(spec, m, shape):
    return spec is not None and any(o.colour != spec.colour for o in m.objects)


def _q10_prompt(spec, m, shape):
    return spec is not None and world.accuracy(spec, m).exact


CHECKS = {
    "Q1": _q1_flat,
    "Q2": _q2_stray_marks,
    "Q3": _q3_present,
    "Q4": _q4_count,
    "Q5": _q5_colour,
    "Q6": _q6_other_shapes,
    "Q7": _q7_well_formed,
    "Q8": _q8_background,
    "Q9": _q9_other_colours,
    "Q10": _q10_prompt,
}


def _question_set(cfg: Config) -> QuestionSet:
    """The run's question set, which must be the shapes world's ten (one check per question id)."""
    questions = QuestionSet.load(resolve_data_path(cfg.judge.questions))
    unknown = [q.id for q in questions.questions if q.id not in CHECKS]
    if unknown:
        raise ValueError(
            f"{questions.source}: the shapes judge answers question ids {', '.join(CHECKS)}; "
            f"unknown: {', '.join(unknown)}"
        )
    return questions


def _check_request(questions: QuestionSet, request: JudgeRequest) -> None:
    """A request must carry this question set, rendered for its own class and prompt: the answers are given
    by question id, in the set's order."""
    if len(request.questions) != len(questions):
        raise ValueError(
            f"got {len(request.questions)} questions, the shapes question set has {len(questions)}"
        )
    if request.questions != questions.render(request.class_name, request.prompt):
        raise ValueError(
            f"the questions are not {questions.source} rendered for class {request.class_name!r} "
            f"and prompt {request.prompt!r}"
        )


class MeasuringJudge:
    """Answers by measuring the image (palette segmentation, connected components, shape features)."""

    model_keys = ()  # loads no model

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.questions = _question_set(cfg)

    def answer(self, images: list[Image.Image], requests: list[JudgeRequest]) -> list[JudgeAnswer]:
        """The class and the prompt come from each request; the image is measured."""
        out = []
        for image, request in zip(images, requests, strict=True):
            _check_request(self.questions, request)
            shape = request.class_name.strip().lower()
            spec = world.parse_caption(request.prompt)
            m = world.measure(image)
            answers = []
            for q in self.questions.questions:
                answers.append("yes" if CHECKS[q.id](spec, m, shape) else "no")
            # Hard decisions: P(yes) is 1 or 0 (the measurement is not a probability model).
            out.append(JudgeAnswer(answers=answers, p_yes=[float(a == "yes") for a in answers]))
        return out

    def close(self) -> None:
        pass


NOISE_PREFIX = "shapes-measurement"


def answer_noise(model: str) -> float:
    """The answer-flip rate a shapes judge model names: ``shapes-measurement`` (0: the measurement as it is) or
    ``shapes-measurement+flip=R`` with R in [0, 0.5] (each answer flipped with probability R)."""
    name, _, option = model.partition("+")
    key, _, value = option.partition("=")
    try:
        rate = float(value) if option else 0.0
    except ValueError:
        rate = -1.0
    if name != NOISE_PREFIX or (option and key != "flip") or not 0.0 <= rate <= 0.5:
        raise ValueError(
            f"judge.model of the shapes judge must be {NOISE_PREFIX!r} or '{NOISE_PREFIX}+flip=R' with R in "
            f"[0, 0.5]; got {model!r}"
        )
    return rate


class NoisyJudge(MeasuringJudge):
    """The measuring judge with answers of a chosen accuracy: each answer is flipped with the probability
    ``judge.model`` names (``shapes-measurement+flip=0.1``), seeded by the image's pixels, the question and
    the run's seed, so a resumed run answers the same.

    Its errors against the proof's evaluator (experiments.shapes.evaluator) are of two kinds, as a VLM's: the
    measurement's own leniencies (rings counted as circles, blue-violet as purple), which are biased and
    repeat on every image alike, and the flips, which are not. ``flip=0`` is the perfect-measurement end of
    the judge-quality sweep (docs/proof.md).
    """

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.flip = answer_noise(cfg.judge.model)

    def answer(self, images: list[Image.Image], requests: list[JudgeRequest]) -> list[JudgeAnswer]:
        out = []
        for image, measured in zip(images, super().answer(images, requests), strict=True):
            rng = random.Random(world.image_seed(image, "flip", self.cfg.seed))
            answers = [
                ({"yes": "no", "no": "yes"}[a] if rng.random() < self.flip else a) for a in measured.answers
            ]
            out.append(JudgeAnswer(answers=answers, p_yes=[float(a == "yes") for a in answers]))
        return out


class RandomJudge:
    """The 'without the judge' ablation: every answer a fair coin, seeded by the image's pixels (so a resumed
    run answers the same). The best eq. (1) score of a prompt is then a random subset of its candidates."""

    model_keys = ()  # loads no model

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.questions = _question_set(cfg)

    def answer(self, images: list[Image.Image], requests: list[JudgeRequest]) -> list[JudgeAnswer]:
        out = []
        for image, request in zip(images, requests, strict=True):
            _check_request(self.questions, request)
            rng = random.Random(world.image_seed(image, self.cfg.seed))
            answers = [rng.choice(("yes", "no")) for _ in request.questions]
            out.append(JudgeAnswer(answers=answers, p_yes=[0.5] * len(answers)))
        return out

    def close(self) -> None:
        pass


class MeasuringDetector:
    """Per image, the confidence that the class is present: its best component's similarity to the class
    prototype (1.0 for a clean render, ~0 for a blank image or a blob of another shape)."""

    model_keys = ()  # loads no model

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def confidence(self, images: list[Image.Image], class_name: str) -> list[float]:
        shape = class_name.strip().lower()
        if shape not in world.CLASSES:
            raise ValueError(f"the shapes detector knows {', '.join(world.CLASSES)}; got {class_name!r}")
        return [round(world.measure(image).confidence(shape), 6) for image in images]

    def close(self) -> None:
        pass
