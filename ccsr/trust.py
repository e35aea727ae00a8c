"""The trust rule: a run directory is data, never code (docs/trust.md).

Run directories are copied between machines, shared, restored and edited by hand, so nothing a run's saved
``config.yaml`` says may make ccsr import or unpickle something the user did not name. The keys that can
(an import-path backend ``package.module:Class``, a model path, and the seed every committed unit was drawn
with) come only from the user's own ``--config`` and ``--set``; the run's config may only repeat them.
``--trust-run-config`` accepts the run's values instead. This module is the one place that rule is applied.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ccsr.inputs import UserError, config_value
from ccsr.models import is_embedded
from ccsr.roles import BACKENDS, MODEL_KEYS, is_import_path

if TYPE_CHECKING:
    from ccsr.config import Config

TRUST_FLAG = "--trust-run-config"

# Model keys whose file is a pickle when it is not an embedded model (a YOLO-World .pt checkpoint).
PICKLED_MODEL_KEYS = ("detector.model",)


def guarded_keys(cfg: Config) -> list[str]:
    """The keys of ``cfg`` that only the user may set: import-path backends, model paths and the seed."""
    backends = [f"{role}.backend" for role in BACKENDS if is_import_path(getattr(cfg, role).backend)]
    return ["seed", *backends, *MODEL_KEYS]


def check_resumed(saved: Config, user: Config, config_path: Path, trust: bool) -> None:
    """Refuse a run whose saved config differs from the user's on a guarded key (unless ``trust``)."""
    if trust:
        return
    for key in dict.fromkeys(guarded_keys(saved) + guarded_keys(user)):
        if config_value(saved, key) != config_value(user, key):
            raise UserError(
                f"{config_path}: {key} is {config_value(saved, key)!r} but your config says {config_value(user, key)!r}; "
                f"a run's config may only repeat it: fix the run's file, or pass {TRUST_FLAG} to use its value"
            )


def check_run_only(saved: Config, config_path: Path, trust: bool) -> None:
    """For a command given only a run directory: refuse to import a backend or unpickle a model file that
    the run's config alone names (unless ``trust``). Built-in backends and embedded models are fine."""
    if trust:
        return
    for role in BACKENDS:
        name = getattr(saved, role).backend
        if is_import_path(name):
            raise UserError(
                f"{config_path}: {role}.backend {name!r} is code named only by the run; pass --config with "
                f"your own config naming it, or {TRUST_FLAG} to import it"
            )
    for key in PICKLED_MODEL_KEYS:
        if not is_embedded(config_value(saved, key)):
            raise UserError(
                f"{config_path}: {key} {config_value(saved, key)!r} is a pickle named only by the run; pass --config "
                f"with your own config naming it, or {TRUST_FLAG} to load it"
            )


def read_run_config(run_dir: Path, user_config: str | None, overrides: list[str], trust: bool) -> Config:
    """The saved config of a run directory, for a command given the run (``eval``, ``generate --run``),
    checked by the rule: against the user's own config (``user_config`` with ``overrides``) when given, else
    on its own."""
    from ccsr.config_files import load_config

    path = Path(run_dir) / "config.yaml"
    saved = load_config(path)
    if user_config:
        check_resumed(saved, load_config(user_config, overrides), path, trust)
    else:
        check_run_only(saved, path, trust)
    return saved
