"""Backends by name, built. Heavy libraries are imported only when their backend is used.

Which backends fill each role, and which config keys name a model, is ``ccsr.roles``; this module turns a
config's ``<role>.backend`` into an object. Either way (a name of the table or an import path
``package.module:Class``) the class takes the whole resolved ``Config`` and implements the role's interface.

A backend class names the models it loads by their config keys: ``model_keys = ("judge.model",)``, ``()`` for
one that loads none. The command line checks those models (and decides whether the run needs the network)
before anything is loaded; a class that says nothing is taken to load every model of its role's section.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING, Any

from ccsr.devices import keep_cpu_threads
from ccsr.roles import BACKENDS, backend_target, section_model_keys

if TYPE_CHECKING:
    from ccsr.config import Config


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
    keys = getattr(cls, "model_keys", None)
    return section_model_keys(role) if keys is None else tuple(keys)


def load_backend(role: str, cfg: Config) -> Any:
    """The backend ``cfg`` names for ``role``, built (its models loaded)."""
    with keep_cpu_threads():  # some libraries change torch's thread count on import
        return backend_class(role, getattr(cfg, role).backend)(cfg)
