"""The four model roles of the loop, as the loop and the evaluation call them (paper section 3).

A backend is a class that takes the whole resolved ``Config`` (``ccsr.backends``) and implements one of these
protocols; nothing registers it, the methods are the contract. Every call is batch-first: lists in, one
result per item out, in input order. Every backend declares the models it loads by their config keys
(``model_keys``, checked by the command line before anything loads; ``()`` for one that loads none) and frees
them in ``close()``, which may be called more than once (the loop's error paths close a backend again).

The backends of the package: ``prompter.TransformersPrompter`` and ``prompter_vllm.VLLMPrompter``,
``generator.DiffusersGenerator``, ``judge.TransformersJudge`` and ``judge_vllm.VLLMJudge``,
``detector.YoloWorldDetector``; the shapes world's in ``experiments/shapes/backends.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

if TYPE_CHECKING:
    from pathlib import Path

    from PIL import Image

    from ccsr.questions import QuestionSet


class Prompter(Protocol):
    """An LLM that writes the class's prompts (paper section 3.1), asked by ``prompter.collect_prompts``."""

    model_keys: ClassVar[tuple[str, ...]]

    def sample(self, messages: list[dict[str, str]], num: int, seed: int) -> list[str]:
        """``num`` (at most ``prompter.MAX_SAMPLES_PER_CALL``) sampled completions of one chat, drawn with
        the seeds ``seed .. seed + num - 1``: sample i with ``seed + i``, or all from one generator seeded
        ``seed``."""
        ...

    def close(self) -> None: ...


class Generator(Protocol):
    """A text-to-image model that draws the candidates and the evaluation images (paper section 3.2)."""

    model_keys: ClassVar[tuple[str, ...]]

    def images(
        self, prompts: list[str], seeds: list[int], lora: str | Path | None = None, scale: float = 1.0
    ) -> list[Image.Image]:
        """One image per (prompt, seed), ``prompts`` and ``seeds`` of the same length. Image i depends only on
        ``prompts[i]``, ``seeds[i]``, the LoRA and its scale, never on the batch it is drawn in (a smaller
        batch after an out-of-memory error draws the same pixels). ``lora=None`` is the base model."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class JudgeRequest:
    """What the judge is asked about one image: the class and the prompt the image was drawn for, and the
    question set rendered for them (``QuestionSet.render``), in question order. A judge that reads the
    image with a model asks it ``questions``; one that measures the image reads ``class_name`` and
    ``prompt``."""

    class_name: str
    prompt: str
    questions: list[str]

    @classmethod
    def rendered(cls, question_set: QuestionSet, class_name: str, prompt: str) -> JudgeRequest:
        """The request for an image of ``class_name`` drawn for ``prompt``."""
        return cls(class_name, prompt, question_set.render(class_name, prompt))


@dataclass
class JudgeAnswer:
    """The model's own answers for one image, in question order (the dependency rule is applied by
    ``QuestionSet.score``), and P(yes)/(P(yes)+P(no)) per question in logits mode (None in generate mode)."""

    answers: list[str]
    p_yes: list[float | None]


class Judge(Protocol):
    """A VLM that answers the question set's yes/no questions about every image (scored by paper eq. 1 in
    ``ccsr.questions``)."""

    model_keys: ClassVar[tuple[str, ...]]

    def answer(self, images: list[Image.Image], requests: list[JudgeRequest]) -> list[JudgeAnswer]:
        """One request per image (``requests[i]`` is about ``images[i]``; a ValueError when the lengths
        differ); one answer per image, with one answer ('yes', 'no' or 'nan') per question of its request."""
        ...

    def close(self) -> None: ...


class Detector(Protocol):
    """An open-vocabulary detector that confirms the class is in an image (paper section 3.3, filter step)."""

    model_keys: ClassVar[tuple[str, ...]]

    def confidence(self, images: list[Image.Image], class_name: str) -> list[float]:
        """Per image, the confidence in [0, 1] that ``class_name`` is in it (0.0 when nothing is found); the
        loop applies the threshold."""
        ...

    def close(self) -> None: ...
