"""One run, several processes: the loop's units shared out over the ranks of a launcher.

Under ``accelerate launch --multi_gpu --num_processes P -m ccsr run ...`` (or ``torchrun``, on one machine or
several sharing the run directory) every process runs the same loop. The prompts stage runs on the main
process only; the candidates, judge and filter stages give each rank every P-th unit (one prompt) and the
evaluation every P-th batch of images; training is data-parallel inside the trainer. Each rank commits its
own units to a shard file of its own (``candidates.rank-1.jsonl``); at the end of the stage the main process
merges the shards into the stage's record file in the one-process order. The work of every unit does not
depend on which rank did it (the seeds are the unit's, the batches are the unit's), so the records and pixels
equal a one-process run's, and a restart with any number of processes continues from every committed unit.

One process (no launcher) is the same code with one rank: no process group, no shard files.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ccsr.records import Record, append_records, read_records, write_records

T = TypeVar("T")
R = TypeVar("R", bound=Record)


class StopRequested(Exception):
    """Raised at a unit boundary when a stop was asked for (signal or stop file), on every rank together."""


@dataclass(frozen=True)
class Ranks:
    """This process's place among the launcher's processes (``WORLD_SIZE``, ``RANK``).

    Read from the environment rather than from accelerate's ``PartialState``, which creates the process group
    when built: the loop needs its rank before that (ultralytics must be imported first, and the main process
    builds the embedded models before the others load them); ``start`` then builds the ``PartialState`` that
    the trainer's ``Accelerator`` shares."""

    world: int = 1
    rank: int = 0

    @classmethod
    def from_env(cls) -> Ranks:
        world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"WORLD_SIZE={world} and RANK={rank} do not describe a process of a launch")
        return cls(world, rank)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mine(self, units: list[T]) -> list[T]:
        """This rank's share: every ``world``-th unit, starting at its rank."""
        return units[self.rank :: self.world]

    def start(self, cpu: bool) -> None:
        """Join the launcher's process group (accelerate's, which the trainer then shares): gloo on the CPU,
        NCCL with this rank's GPU as the current device otherwise. Nothing to do for one process."""
        if self.world > 1:
            from accelerate import PartialState

            PartialState(cpu=cpu)

    @staticmethod
    def close() -> None:
        """Leave the process group at the end of a launched command. A process that exits with its gloo group
        still up can abort in the group's threads at interpreter exit ("terminate called without an active
        exception"), failing a launch whose work was all done."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any: a stop asked for on one rank, a failed setup.
        Every rank must call it the same number of times (it is also a barrier)."""
        if self.world == 1:
            return flag
        import torch.distributed as dist

        flags: list = [None] * self.world
        dist.all_gather_object(flags, bool(flag))
        return any(flags)

    def barrier(self) -> None:
        self.any(False)

    def shard_path(self, path: Path) -> Path:
        """Where this rank commits the records of ``path`` (``path`` itself for one process)."""
        return path if self.world == 1 else path.with_name(f"{path.stem}.rank-{self.rank}{path.suffix}")


def shard_files(path: Path) -> list[Path]:
    """Every rank's shard of ``path`` left in its folder, by this run or an earlier one of another size."""
    return sorted(path.parent.glob(f"{path.stem}.rank-*{path.suffix}"))


def read_committed(path: Path, cls: type[R], strict: bool = False) -> list[R]:
    """The records of ``path`` and of every shard beside it: all units committed so far, by any rank
    (``strict``: see ``read_records``)."""
    out = read_records(path, cls, strict)
    for shard in shard_files(path):
        out += read_records(shard, cls, strict)
    return out


def merge_shards(
    path: Path, cls: type[R], key: Callable[[R], Hashable], order: Callable[[R], tuple]
) -> list[R]:
    """Main process, after every rank has committed: the records of ``path`` and its shards, each ``key``
    once, sorted by ``order`` (the one-process order), written to ``path``; the shards are removed after.
    A crash in between leaves records in both, which the next merge counts once."""
    seen: dict[Hashable, R] = {}
    for r in read_committed(path, cls):
        seen.setdefault(key(r), r)
    records = sorted(seen.values(), key=order)
    write_records(path, records)
    for shard in shard_files(path):
        shard.unlink()
    return records


def positions(items: Iterable[Hashable]) -> dict[Hashable, int]:
    """Each item's index, for sorting records in the order of the list they came from."""
    return {item: i for i, item in enumerate(items)}


# --------------------------------------------------------------------------------------------------------------
# data-parallel LoRA training: each process takes a share of every global batch (see ccsr.trainer)


def run_sharded(
    ranks: Ranks,
    path: Path,
    cls: type[R],
    todo: Callable[[list[R]], dict[str, Any]],
    work: Callable[[Callable[[], Any], str, Any], list[R]],
    load: Callable[[], Any],
    prompt_order: list[str],
    before_unit: Callable[[str], bool],
    desc: str,
) -> list[R] | None:
    """The protocol of every data-parallel stage whose unit is one prompt; returns, on the main process,
    every rank's records merged into ``path`` in the one-process order (prompt, then index), None elsewhere.

    ``todo(committed)`` gives the units still to do (prompt id -> unit, in the run's order) from the records
    committed so far by any rank and any earlier process; this rank does every ``world``-th. ``work(model,
    prompt_id, unit)`` returns the unit's records, appended to this rank's shard before the next unit starts.
    ``model()`` is ``load()``'s backend, built at its first call (inside ``work``'s own timing, so loading and
    the first unit share one thread-count guard) and closed at the end; a rank without units loads none.
    ``before_unit(prompt_id)`` is true when a stop was asked for: every rank's share then ends at its next
    unit and all raise ``StopRequested`` together.
    """
    from ccsr.console import bar

    share = ranks.mine(list(todo(read_committed(path, cls)).items()))
    loaded = None

    def model() -> Any:
        nonlocal loaded
        loaded = loaded or load()
        return loaded

    stopped = False
    try:
        for prompt_id, unit in bar(share, desc=desc, unit="prompt", disable=not ranks.is_main):
            if before_unit(prompt_id):
                stopped = True
                break
            append_records(ranks.shard_path(path), work(model, prompt_id, unit))
        if ranks.any(stopped):
            raise StopRequested
    finally:
        if loaded is not None:
            loaded.close()
    if not ranks.is_main:
        return None
    order = positions(prompt_order)
    return merge_shards(
        path,
        cls,
        key=lambda r: (r.prompt_id, r.index),
        order=lambda r: (order.get(r.prompt_id, len(order)), r.prompt_id, r.index),
    )


def shard(size: int, num_processes: int, process_index: int) -> tuple[int, int]:
    """[lo, hi) of this process's share of a global batch of ``size``: contiguous, sizes differ by at most 1."""
    return size * process_index // num_processes, size * (process_index + 1) // num_processes


def all_reduce_gradients(accelerator, params: list) -> None:
    """Sum the gradients of ``params`` over processes, in one collective on one flat buffer.

    Each process's loss is its share of the global-batch mean (sum over its samples / global batch size), so
    the sum over processes is the single-process gradient. An explicit sum rather than DDP's bucketed mean:
    shares may be unequal (batch 18 on 4 processes, the short last batch of an epoch) or empty, and the LoRA
    gradient is a few MB at most, so overlapping communication with backward buys nothing.
    """
    import torch

    for p in params:
        if p.grad is None:  # a parameter no sample reached: its gradient is zero, not missing
            p.grad = torch.zeros_like(p)
    flat = accelerator.reduce(torch.cat([p.grad.reshape(-1) for p in params]), reduction="sum")
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
        offset += p.numel()


def adapter_digest(unet) -> str:
    """sha256 over the trained adapter's tensors (names, dtypes, shapes and bytes), in name order."""
    import hashlib

    from ccsr.lora import adapter_state

    digest = hashlib.sha256()
    for name, tensor in sorted(adapter_state(unet).items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def check_ranks_in_sync(accelerator, unet) -> list[str]:
    """Every process's adapter digest (process order); raise if they differ, i.e. the replicas diverged."""
    from accelerate.utils import gather_object

    digests = gather_object([adapter_digest(unet)])
    if len(set(digests)) != 1:
        raise RuntimeError(f"LoRA weights differ across processes after training: {digests}")
    return digests
