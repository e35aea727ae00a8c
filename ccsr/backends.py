"""Backends by name. Heavy libraries are imported only when their backend is used.

A config's ``<role>.backend`` is either a name of this table or an import path ``package.module:Class`` of a
backend outside the package (an experiment's, such as ``experiments.shapes.backends:MeasuringJudge``). Either
way the class takes the whole resolved ``Config`` and implements the role's interface.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ccsr.config import Config

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


def load_backend(role: str, cfg: Config) -> Any:
    from ccsr.devices import keep_cpu_threads

    module, cls = backend_target(role, getattr(cfg, role).backend).split(":")
    with keep_cpu_threads():  # some libraries change torch's thread count on import
        return getattr(importlib.import_module(module), cls)(cfg)
