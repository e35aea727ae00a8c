"""The loop's four model roles: what each one is asked (its protocol), which backends can fill it, and the
config keys that name a model (paper section 3).

A backend is a class that takes the whole resolved ``Config`` (``ccsr.backends`` builds it) and implements one
of these protocols; nothing registers it, the methods are the contract. Every call is batch-first: lists in,
one result per item out, in input order. Every backend declares the models it loads by their config keys
(``model_keys``, checked by the command line before anything loads; ``()`` for one that loads none) and frees
them in ``close()``, which may be called more than once (the loop's error paths close a backend again).

A config's ``<role>.backend`` is either a name of ``BACKENDS`` or an import path ``package.module:Class`` of a
backend outside the package (the shapes world's, such as ``experiments.shapes.backends:MeasuringJudge``).

This module is the ground floor of the configuration: it imports nothing of ccsr at run time, so
``ccsr.config`` can check backend names and model keys against it and ``ccsr.backends`` can sit above both
without a circle.
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


# role -> backend name -> "module:Class". The modules are imported only when their backend is used.
BACKENDS = {
    "prompter": {
        "transformers": "ccsr.prompter:TransformersPrompter",
        "vllm": "ccsr.prompter_vllm:VLLMPrompter",
    },
    "generator": {"diffusers": "ccsr.generator:DiffusersGenerator"},
    "judge": {
        "transformers": "ccsr.judge:TransformersJudge",
        "vllm": "ccsr.judge_vllm:VLLMJudge",
    },
    "detector": {"yolo_world": "ccsr.detector:YoloWorldDetector"},
}


@dataclass(frozen=True)
class ModelKey:
    """What a config key naming a model must point at, when it points at something on disk.

    ``required`` is the file a local folder of that kind holds (None: the key names a YOLO-World ``.pt``
    file, or a folder with one); a folder whose config.json ``model_type`` does not start with one of
    ``model_types`` (when given) is of another kind.
    """

    what: str  # "a CLIP folder", as the error messages name it
    required: str | None
    model_types: tuple[str, ...] = ()
    # Loaded by every run whatever the backends: the trainer fine-tunes generator.model, the evaluation
    # scores with evaluator.model. Any other key is loaded only by a backend of the role named by its section.
    always_loaded: bool = False


# Every config key that names a model (hub id, local folder or ccsr-tiny/<name>), in config order. A
# backend class that does not say which of its section's keys it loads (``model_keys``) loads them all.
MODEL_KEYS = {
    "prompter.model": ModelKey("a causal language model folder", "config.json"),
    "generator.model": ModelKey(
        "a diffusers Stable Diffusion folder", "model_index.json", always_loaded=True
    ),
    "judge.model": ModelKey("a LLaVA-Next folder", "config.json", ("llava",)),
    "detector.model": ModelKey("a YOLO-World .pt file", None),
    "detector.text_model": ModelKey("a CLIP folder", "config.json", ("clip",)),
    "evaluator.model": ModelKey("a CLIP folder", "config.json", ("clip",), always_loaded=True),
}


def section_model_keys(section: str) -> tuple[str, ...]:
    """The model keys of one config section (``detector`` -> ``detector.model``, ``detector.text_model``)."""
    return tuple(key for key in MODEL_KEYS if key.split(".")[0] == section)


def is_import_path(name: str) -> bool:
    """``package.module:Class``: a backend named by where it lives rather than by a name of the table."""
    module, sep, cls = name.partition(":")
    return bool(sep) and all(part.isidentifier() for part in module.split(".")) and cls.isidentifier()


def backend_target(role: str, name: str) -> str:
    """The ``module:Class`` of a backend name; raises ValueError naming the choices for an unknown one."""
    if name in BACKENDS[role]:
        return BACKENDS[role][name]
    if is_import_path(name):
        return name
    raise ValueError(
        f"unknown {role} backend {name!r}: use one of {', '.join(BACKENDS[role])} "
        "or an import path package.module:Class"
    )
