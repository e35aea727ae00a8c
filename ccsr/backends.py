"""Backends by name. Heavy libraries are imported only when their backend is used.

A config's ``<role>.backend`` is either a name of this table or an import path ``package.module:Class`` of a
backend outside the package (an experiment's, such as ``experiments.shapes.backends:MeasuringJudge``). Either
way the class takes the whole resolved ``Config`` and implements the role's interface.

A backend class names the models it loads by their config keys: ``model_keys = ("judge.model",)``, ``()`` for
one that loads none. The command line checks those models (and decides whether the run needs the network)
before anything is loaded; a class that says nothing is taken to load every model of its role's section.
"""

from __future__ import annotations

import importlib
import os
import sys
import typing
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


def backend_class(role: str, name: str) -> type:
    """The class of a backend name. Importing it is cheap: backends import their heavy libraries when built.

    Raises ValueError naming the import path when the module or the class is not there.
    """
    target = backend_target(role, name)
    module, cls = target.split(":")
    if name not in BACKENDS[role] and "" not in sys.path and os.getcwd() not in sys.path:
        # An import path is looked up as ``python -m`` would, the current folder first: the ``ccsr`` script's
        # own sys.path starts at its bin folder, where no experiment lives.
        sys.path.insert(0, os.getcwd())
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot import {target} ({exc})") from exc


def loaded_model_keys(role: str, cls: type) -> tuple[str, ...]:
    """The config keys of the models a backend class loads: its ``model_keys``, else every model key of its
    role's section (``judge.model``; ``detector.model`` and ``detector.text_model``)."""
    from ccsr.config import Config

    keys = getattr(cls, "model_keys", None)
    if keys is None:
        keys = tuple(f"{role}.{name}" for name in typing.get_type_hints(Config)[role].model_fields)
    return tuple(keys)


def load_backend(role: str, cfg: Config) -> Any:
    from ccsr.devices import keep_cpu_threads

    with keep_cpu_threads():  # some libraries change torch's thread count on import
        return backend_class(role, getattr(cfg, role).backend)(cfg)
