"""What the benchmarks share: a loop on a fresh run directory."""

from __future__ import annotations

import shutil
from pathlib import Path

from ccsr.config import Config
from ccsr.config_files import save_config
from ccsr.loop import Loop
from ccsr.rundir import RunDir


def fresh_loop(cfg: Config, root: Path, loop_class: type[Loop] = Loop) -> Loop:
    """A ``loop_class`` on an empty run directory at ``root`` holding ``cfg`` as its config, as ``ccsr run``
    starts one. Whatever ``root`` held before is deleted: a benchmark times a run from its first stage."""
    root = Path(root)
    if root.exists():
        shutil.rmtree(root)
    run = RunDir(root)
    run.root.mkdir(parents=True)
    save_config(cfg, run.config_path)
    return loop_class(cfg, run)
