"""The loop's roles: the backends that can fill each, and the config keys that name a model.

This module is the ground floor of the configuration: it imports nothing of ccsr, so ``ccsr.config`` can
check backend names and model keys against it and ``ccsr.backends`` (which builds backends) can sit above
both without a circle.

A config's ``<role>.backend`` is either a name of ``BACKENDS`` or an import path ``package.module:Class`` of a
backend outside the package (an experiment's, such as ``experiments.shapes.backends:MeasuringJudge``).
"""

from __future__ import annotations

from dataclasses import dataclass

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
