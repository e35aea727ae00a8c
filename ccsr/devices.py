"""Device and dtype resolution shared by every backend (nothing hard-coded to cuda)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import contextmanager
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import torch

    from ccsr.config import Config

logger = logging.getLogger(__name__)
T = TypeVar("T")


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


@contextmanager
def torch_threads(n: int = 1):
    """Run the enclosed compute on ``n`` CPU threads, then restore the previous count.

    For work made of many tiny ops (the tiny models' builders that compute, the CPU gpu-check): a second
    thread buys nothing there, and on a busy 2-core box it made them 3-13x slower (measured: YOLO-World build
    8 s on one thread, 104 s on two). A fixed count also makes the results independent of the core count,
    which changes float summation order (the tiny detector's calibrated head bias moved in the 3rd decimal).
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def free_memory() -> None:
    """Called between stages: the roles don't fit on one GPU together, so each stage frees its model.

    The same two steps as diffusers' ``training_utils.free_memory``, written here because importing that
    module costs 1-4 s (measured on the CPU machine) and pulls diffusers into stages that never use it."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def shutdown_vllm(llm) -> None:
    """Stop a vLLM engine now, not whenever the garbage collector gets to it: the next stage needs its memory.

    vLLM offers no shutdown in every version: ``LLM.shutdown()`` where it exists, else the V1 engine client's
    (``llm.llm_engine.engine_core.shutdown()``, which stops the engine-core process holding the weights and
    the KV cache, or the in-process core). vLLM's own model-parallel groups go too (none when the engine ran in
    its own process). The caller then drops its references and calls ``free_memory``.
    """
    shutdown = getattr(llm, "shutdown", None)
    if not callable(shutdown):
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        shutdown = getattr(core, "shutdown", None)
    if callable(shutdown):
        shutdown()
    try:
        from vllm.distributed.parallel_state import destroy_model_parallel
    except ImportError:  # a vLLM without it, or none: nothing of its state to tear down
        return
    destroy_model_parallel()


def in_batches(call: Callable[[slice], list[T]], total: int, size: int, what: str) -> list[T]:
    """``call`` on consecutive slices of ``total`` items, at most ``size`` at a time, results concatenated in
    order. On a CUDA out-of-memory error the same slice is tried again at half the size (down to 1), as the
    generator does: every stage works in batches of its configured size and backs off instead of failing."""
    import torch

    out: list[T] = []
    start = 0
    while start < total:
        chunk = slice(start, min(start + size, total))
        try:
            results = call(chunk)
        except torch.cuda.OutOfMemoryError:
            if size == 1:
                raise
            size = max(1, size // 2)
            logger.warning("%s: out of GPU memory, retrying with batch size %d", what, size)
            torch.cuda.empty_cache()
            continue
        if len(results) != chunk.stop - chunk.start:
            raise RuntimeError(f"{what}: {len(results)} results for {chunk.stop - chunk.start} inputs")
        out.extend(results)
        start = chunk.stop
    return out
