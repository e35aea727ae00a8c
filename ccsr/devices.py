"""Device and dtype resolution shared by every backend (nothing hard-coded to cuda)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from ccsr.config import Config


def torch_device(cfg: Config) -> torch.device:
    import torch

    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def torch_dtype(cfg: Config) -> torch.dtype:
    import torch

    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[cfg.dtype]
    if torch_device(cfg).type == "cpu" and dtype == torch.float16:
        return torch.float32  # half matmuls are slow or missing on CPU
    return dtype


@contextmanager
def keep_cpu_threads():
    """Restore torch's CPU thread count after code that changes it.

    ultralytics sets ``torch.set_num_threads(cores - 1)`` on import and on every predict; CPU results depend on
    the thread count (reduction order), so a resumed run would draw different pixels than an uninterrupted one.
    """
    import torch

    n = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


def free_memory() -> None:
    """Called between stages: the roles don't fit on one GPU together, so each stage frees its model."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
