"""Model resolution: a config names a hub id, a local folder, or an embedded tiny model ``ccsr-tiny/<name>``.

The embedded default is a set of tiny random-weight models of the real architectures, built offline and
deterministically (fixed seed) by ``ccsr/tiny/`` into ``<cache>/<name>-v<BUILD_VERSION>`` the first time they
are needed, then loaded by the same ``from_pretrained`` / model-file code as a real checkpoint. This module is
the only runtime module that reaches the tiny builders (``tests/test_layering.py`` holds the package to that);
every other name is returned unchanged.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from ccsr.console import CONSOLE

logger = logging.getLogger(__name__)

PREFIX = "ccsr-tiny/"

# name -> "module:function"; each builder takes (out_dir: Path, seed: int) and writes a loadable model.
BUILDERS = {
    "stable-diffusion": "ccsr.tiny.sd:build_stable_diffusion",
    "mistral": "ccsr.tiny.llm:build_mistral",
    "llava-next": "ccsr.tiny.llava:build_llava_next",
    "clip": "ccsr.tiny.clip:build_clip",
    "yolo-world": "ccsr.tiny.yolo:build_yolo_world",
}
# Bumped when a builder changes so stale caches are rebuilt rather than trusted.
BUILD_VERSION = "3"


def default_cache_dir() -> Path:
    env = os.environ.get("CCSR_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ccsr" / "tiny"


def is_embedded(name: str) -> bool:
    return name.startswith(PREFIX)


def check_embedded(name: str) -> None:
    """Raise ValueError naming the known embedded models when ``name`` is not one of them."""
    if name[len(PREFIX) :] not in BUILDERS:
        raise ValueError(
            f"unknown embedded model '{name}' (known: {', '.join(PREFIX + k for k in BUILDERS)})"
        )


def model_path(name: str, cache_dir: str | Path | None = None) -> Path:
    """Where the embedded model ``name`` lives (built or not); nothing is built here."""
    check_embedded(name)
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    return root / f"{name[len(PREFIX) :]}-v{BUILD_VERSION}"


def build_once(out: Path, build: Callable[[Path], None], stamp: str) -> Path:
    """``out``, built first by ``build(folder)`` if it is not there yet. Processes that ask at the same time
    wait on a file lock; the folder is built under a temporary name beside it and renamed, so it appears whole
    or not at all (a failed build leaves nothing behind). ``stamp`` (a build version) marks it finished."""
    done = out / ".ccsr-built"
    if done.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out.parent / f".{out.name}.lock")):
        if done.exists():
            return out
        tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            build(tmp)
            (tmp / ".ccsr-built").write_text(stamp, encoding="utf-8")
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def build_embedded(cfg) -> None:
    """Build (or find in the cache) every embedded tiny model ``cfg`` names, e.g. before a timed run."""
    from ccsr.config import model_keys

    for key in model_keys():
        section, field = key.split(".")
        resolve_model(getattr(getattr(cfg, section), field), cfg.model_cache)


def resolve_model(name: str, cache_dir: str | Path | None = None) -> str:
    """Return a loadable path or id for ``name``, building the embedded model first if needed."""
    if not is_embedded(name):
        return name
    module, func = BUILDERS[name[len(PREFIX) :]].split(":")

    def build(folder: Path) -> None:
        logger.info("building embedded tiny model %s (first use only)", name, extra=CONSOLE)
        folder.mkdir(parents=True)
        getattr(importlib.import_module(module), func)(folder, seed=0)

    return str(build_once(model_path(name, cache_dir), build, BUILD_VERSION))
