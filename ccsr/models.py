"""Model resolution: a config names a hub id, a local folder, or an embedded tiny model ``ccsr-tiny/<name>``.

The embedded default is a set of tiny random-weight models of the real architectures, built offline and
deterministically (fixed seed) by ``ccsr/tiny/`` into ``<cache>/<name>-v<BUILD_VERSION>`` the first time they
are needed, then loaded by the same ``from_pretrained`` / model-file code as a real checkpoint. This module is
the only runtime module that reaches the tiny builders; every other name is returned unchanged.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
from pathlib import Path

from filelock import FileLock

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


def resolve_model(name: str, cache_dir: str | Path | None = None) -> str:
    """Return a loadable path or id for ``name``, building the embedded model first if needed."""
    if not is_embedded(name):
        return name
    key = name[len(PREFIX) :]
    out = model_path(name, cache_dir)
    root = out.parent
    done = out / ".ccsr-built"
    if done.exists():
        return str(out)
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{key}.lock")):
        if done.exists():
            return str(out)
        tmp = root / f".{key}-v{BUILD_VERSION}.tmp{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        logger.info("building embedded tiny model %s in %s", name, out)
        module, func = BUILDERS[key].split(":")
        getattr(importlib.import_module(module), func)(tmp, seed=0)
        (tmp / ".ccsr-built").write_text(BUILD_VERSION)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    return str(out)
