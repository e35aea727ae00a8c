"""Training checkpoints: one folder per optimizer step, committed whole, trusted only when intact and written
for the same training setup (the fingerprint).

``out_dir/checkpoints/step-<n>/`` holds ``adapter.safetensors`` (the LoRA weights), one ``<name>.pt`` per
training state (``optimizer``, ``lr_scheduler`` and, under fp16, ``grad_scaler``: torch state dicts, read back
with ``weights_only=True``), ``rng.safetensors`` (the torch CPU generator), ``state.json`` (step, data
position, loss, fingerprint) and ``complete.json`` (sha256 of every other file), written last. The folder is
written under a temporary name and renamed, so a torn write is never a ``step-<n>`` folder; a corrupted one
fails its checksums.

Why not ``accelerator.save_state``/``load_state``: the UNet is deliberately not ``prepare``d (no DDP, see the
trainer), so accelerate would save no adapter weights at all, or the whole UNet once prepared; its
``load_state`` also resets Python's and NumPy's global generators and ``accelerator.step``, state the trainer
never draws from and the calling process (the loop) owns; and it keeps its RNG states in a pickle, where we
keep ours in safetensors. Resume is exact without any of it: every draw comes from a generator seeded by the
step (see ``ccsr.batches``). A new training state is one more entry in ``states``.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from ccsr.lora import ADAPTER_NAME
from ccsr.rundir import atomic_path, atomic_save_tensors, atomic_write_text, sha256_file

if TYPE_CHECKING:
    import torch


logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
TRAIN_LOG = "train_log.jsonl"
GRAD_SCALER_STATE = "grad_scaler"  # the fp16 GradScaler's entry in ``states``


def checkpoint_step(path: Path) -> int | None:
    """n of a ``step-<n>`` folder, None for anything else."""
    name = path.name
    if not name.startswith("step-"):
        return None
    try:
        return int(name[len("step-") :])
    except ValueError:
        return None


def _step_folders(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if checkpoint_step(p) is not None), key=checkpoint_step)


def write_checkpoint(
    root: Path, step: int, adapter: dict[str, torch.Tensor], states: dict[str, dict], state: dict, kept: int
) -> Path:
    """Commit ``root/step-<step>/`` (see the module docstring), then keep only the newest ``kept`` folders."""
    import torch

    final = root / f"step-{step}"
    if final.exists():
        shutil.rmtree(final)
    # The folder itself is committed by atomic_path (fsync, rename); each file in it is committed on its own.
    with atomic_path(final) as tmp:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            atomic_save_tensors(adapter, tmp / "adapter.safetensors")
            for name, state_dict in states.items():
                with atomic_path(tmp / f"{name}.pt") as part:
                    torch.save(state_dict, part)
            rng = {"torch_cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng.update({f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
            atomic_save_tensors(rng, tmp / "rng.safetensors")
            atomic_write_text(tmp / "state.json", json.dumps(state, indent=1))
            checksums = {path.name: sha256_file(path) for path in sorted(tmp.iterdir())}
            atomic_write_text(
                tmp / "complete.json", json.dumps({"step": step, "sha256": checksums}, indent=1)
            )
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    for old in _step_folders(root)[:-kept]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _valid_checkpoint(path: Path, fingerprint: str) -> dict | None:
    """The checkpoint's state if it is complete, intact and from the same training setup, else None."""
    marker = path / "complete.json"
    if not marker.exists():
        logger.warning("skipping checkpoint %s: no complete.json (torn write)", path)
        return None
    try:
        sums = json.loads(marker.read_text(encoding="utf-8"))["sha256"]
        for name, digest in sums.items():
            if sha256_file(path / name) != digest:
                logger.warning("skipping checkpoint %s: checksum mismatch in %s", path, name)
                return None
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError):
        logger.warning("skipping checkpoint %s: unreadable", path, exc_info=True)
        return None
    if state.get("fingerprint") != fingerprint:
        logger.warning("skipping checkpoint %s: written for a different training setup", path)
        return None
    return state


def latest_checkpoint(root: Path, fingerprint: str) -> tuple[Path, dict] | None:
    """(folder, state) of the newest valid checkpoint under ``root``, or None."""
    for path in reversed(_step_folders(root)):
        state = _valid_checkpoint(path, fingerprint)
        if state is not None:
            return path, state
    return None


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict], torch.Tensor]:
    """(adapter weights, training states by name, torch CPU generator state) of a valid checkpoint folder.
    Never unpickles anything but plain tensors and containers (``weights_only=True``)."""
    import torch
    from safetensors.torch import load_file

    adapter = load_file(str(path / "adapter.safetensors"))
    states = {p.stem: torch.load(p, weights_only=True) for p in sorted(path.glob("*.pt"))}
    rng = load_file(str(path / "rng.safetensors"))["torch_cpu"]
    return adapter, states, rng


def training_states(optimizer, lr_scheduler, scaler) -> dict[str, dict]:
    """What a checkpoint keeps besides the adapter weights and the generator: the optimizer's and the lr
    scheduler's states and, under fp16 (``scaler`` not None), the GradScaler's loss scale and growth tracker:
    a resume from the initial scale would skip other steps on overflow, and scale the loss otherwise, than the
    uninterrupted run."""
    states = {"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict()}
    if scaler is not None:
        states[GRAD_SCALER_STATE] = scaler.state_dict()
    return states


def restore(path: Path, unet, optimizer, lr_scheduler, scaler) -> None:
    """Set the trained adapter, the training states and the torch CPU generator from a valid checkpoint."""
    import torch
    from peft import set_peft_model_state_dict

    adapter, states, rng = read_checkpoint(path)
    set_peft_model_state_dict(unet, adapter, adapter_name=ADAPTER_NAME)
    optimizer.load_state_dict(states["optimizer"])
    lr_scheduler.load_state_dict(states["lr_scheduler"])
    if scaler is not None and GRAD_SCALER_STATE in states:
        scaler.load_state_dict(states[GRAD_SCALER_STATE])
    elif scaler is not None:
        logger.warning("checkpoint %s keeps no fp16 loss scale: the GradScaler starts afresh", path)
    torch.set_rng_state(rng)


def drop_checkpoints_after(root: Path, step: int) -> None:
    """Remove temp folders and checkpoints past ``step`` (the resume point): they are torn, corrupt or from
    another setup, would only confuse the rotation (and a later resume), and the steps they cover are redone."""
    if not root.is_dir():
        return
    for path in root.iterdir():
        step_of = checkpoint_step(path)
        if path.name.startswith(".step-") or (step_of is not None and step_of > step):
            shutil.rmtree(path, ignore_errors=True)


def rewrite_log(path: Path, last_step: int) -> None:
    """Drop log lines of steps after the checkpoint we resume from: they are about to be redone."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))
