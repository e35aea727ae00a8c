"""Train one iteration's LoRA outside the loop, under a process launcher.

    accelerate launch --multi_gpu --num_processes 2 -m ccsr.train_cli --run-dir runs/giraffe --iteration 1
    torchrun --standalone --nproc_per_node 2 -m ccsr.train_cli --run-dir runs/giraffe --iteration 1
    python -m ccsr.train_cli --run-dir runs/giraffe --iteration 1          # one process

It trains what the loop's train stage would: the run's saved ``config.yaml``, the pairs of
``Loop.training_pairs(k)`` (iterations 1..k, or only k with ``trainer.train_on: newest``), started from
``Loop.previous_lora(k)`` (the champion before k) when ``trainer.init_from: previous``, written to
``iterations/NNN/lora`` with the run's shared encoding cache. The loop's own bookkeeping is left to the loop:
when ``ccsr run`` reaches the train stage of k, train_lora finds the finished LoRA of the same setup and returns
at once, so the run continues as if it had trained it itself.

On a CPU-only machine use ``--multi_gpu`` (with the trainer's ``Accelerator(cpu=True)`` it runs gloo ranks):
``accelerate launch --cpu --num_processes 2`` silently runs ONE process (FIELD-NOTES).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ccsr.config import ConfigError, load_config
from ccsr.rundir import RunDir, RunDirError

logger = logging.getLogger("ccsr.train_cli")

EXIT_BAD_INPUT = 2
# The hub/ultralytics switches, read by those libraries at import time (same list as ccsr.cli).
OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "YOLO_OFFLINE")


class TrainCliError(Exception):
    """Anything the user can fix; printed as one line."""


def _is_main_process() -> bool:
    # Launchers (torchrun, accelerate launch) export RANK; read before any process group exists.
    return os.environ.get("RANK", "0") == "0"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ccsr.train_cli",
        description="Train the LoRA of one iteration of a ccsr run (works under accelerate launch / torchrun).",
    )
    parser.add_argument("--run-dir", required=True, type=Path, help="the run directory (holds config.yaml)")
    parser.add_argument("--iteration", required=True, type=int, help="iteration k whose LoRA to train")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    return parser


def train_iteration(run_dir: Path, k: int):
    """Train iteration ``k``'s LoRA of the run in ``run_dir`` the way the loop's train stage does."""
    from ccsr.loop import Loop

    run = RunDir(run_dir)
    if not run.config_path.is_file():
        raise TrainCliError(f"{run.root} has no config.yaml; pass the --run-dir of a run made by `ccsr run`")
    if k < 1:
        raise TrainCliError(f"--iteration must be >= 1, got {k}")
    cfg = load_config(run.config_path)
    if cfg.offline:
        for var in OFFLINE_VARS:
            os.environ[var] = "1"
    loop = Loop(cfg, run)
    needed = [k] if cfg.trainer.train_on == "newest" else list(range(1, k + 1))
    missing = [j for j in needed if not run.files(j)["pairs"].is_file()]
    if missing:
        raise TrainCliError(
            f"{run.root}: iteration {missing[0]} has no pairs.jsonl yet; run the loop up to its filter stage"
        )
    records = loop.training_pairs(k)
    if not records:
        raise TrainCliError(f"{run.root}: no training pairs for iteration {k}; nothing to train")
    init = loop.previous_lora(k) if cfg.trainer.init_from == "previous" else None

    from ccsr.trainer import TrainPair, train_lora

    pairs = [
        TrainPair(prompt=p["prompt"], image_path=run.root / p["path"], score=float(p["score"]))
        for p in records
    ]
    result = train_lora(cfg, pairs, run.lora_dir(k), init_lora=init, encode_cache_dir=run.encode_cache)
    if _is_main_process():
        run.event(
            "train_cli",
            iteration=k,
            pairs=len(pairs),
            steps=result.steps,
            final_loss=result.final_loss,
            num_processes=int(os.environ.get("WORLD_SIZE", "1")),
            init_lora=str(init) if init else None,
        )
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    main_process = _is_main_process()
    logging.basicConfig(
        level=logging.INFO if main_process else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    lock = None
    try:
        if main_process and (args.run_dir / "config.yaml").is_file():
            from filelock import FileLock, Timeout

            # The loop's lock: a running `ccsr run`/daemon on this run dir must not race our writes.
            lock = FileLock(str(RunDir(args.run_dir).lock_path))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                raise TrainCliError(
                    f"{args.run_dir} is in use by another ccsr process; stop it before training by hand"
                ) from None
        result = train_iteration(args.run_dir, args.iteration)
    except (TrainCliError, ConfigError, RunDirError, ValueError) as exc:
        if args.debug:
            raise
        print(f"ccsr.train_cli: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        if lock is not None:
            lock.release()
    logger.info("iteration %d: LoRA in %s (%d steps)", args.iteration, result.lora_dir, result.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
