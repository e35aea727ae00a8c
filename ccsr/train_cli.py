"""Train one iteration's LoRA outside the loop, under a process launcher.

    accelerate launch --multi_gpu --num_processes 2 -m ccsr.train_cli --run-dir runs/giraffe --iteration 1
    torchrun --standalone --nproc_per_node 2 -m ccsr.train_cli --run-dir runs/giraffe --iteration 1
    python -m ccsr.train_cli --run-dir runs/giraffe --iteration 1          # one process

It runs the loop's own train stage (``ccsr.train``) on the run's saved ``config.yaml``: the pairs (objective
dpo: the preference pairs) of iterations 1..k (only k with ``trainer.train_on: newest``), started from the
champion before k when ``trainer.init_from: previous``, written to ``iterations/NNN/lora`` with the run's
shared encoding cache and prior images. The loop's own bookkeeping is left to the loop: when ``ccsr run``
reaches the train stage of k, it finds the finished LoRA of the same setup and returns at once, so the run
continues as if it had trained it itself.

On a CPU-only machine use ``--multi_gpu`` (with the trainer's ``Accelerator(cpu=True)`` it runs gloo ranks):
``accelerate launch --cpu --num_processes 2`` silently runs ONE process.
"""

from __future__ import annotations

import argparse
import logging
import sys
from contextlib import nullcontext
from pathlib import Path

from ccsr import train
from ccsr.config import ConfigError
from ccsr.config_files import load_config
from ccsr.distributed import Ranks
from ccsr.inputs import UserError
from ccsr.rundir import RunDir, RunDirError, run_lock

logger = logging.getLogger("ccsr.train_cli")

EXIT_BAD_INPUT = 2


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
    """Train iteration ``k``'s LoRA of the run in ``run_dir`` with the loop's train-stage code."""
    from ccsr.inputs import set_offline

    run = RunDir(run_dir)
    if not run.config_path.is_file():
        raise UserError(f"{run.root} has no config.yaml; pass the --run-dir of a run made by `ccsr run`")
    if k < 1:
        raise UserError(f"--iteration must be >= 1, got {k}")
    cfg = load_config(run.config_path)
    set_offline(cfg)
    # The objective trains on the pairs or on the preference pairs: both are written by the filter stage.
    kind = train.trainer_class(cfg).trains_on
    missing = [j for j in train.training_iterations(cfg, k) if not run.files(j)[kind].is_file()]
    if missing:
        raise UserError(
            f"{run.root}: iteration {missing[0]} has no {kind}.jsonl yet; run the loop up to its filter stage"
        )
    examples = train.training_records(cfg, run, k)
    if not examples:
        raise UserError(f"{run.root}: no training {kind} for iteration {k}; nothing to train")
    job = train.iteration_job(cfg, run, k)
    result = train.run_job(cfg, job)
    ranks = Ranks.from_env()  # the launcher's WORLD_SIZE and RANK, read before any process group exists
    if ranks.is_main:
        run.event(
            "train_cli",
            iteration=k,
            pairs=len(examples),
            steps=result.steps,
            final_loss=result.final_loss,
            num_processes=ranks.world,
            init_lora=str(job.init_lora) if job.init_lora else None,
        )
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    main_process = Ranks.from_env().is_main
    logging.basicConfig(
        level=logging.INFO if main_process else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    run = RunDir(args.run_dir)
    try:
        # The loop's lock, held by the main process: a running `ccsr run`/daemon must not race our writes.
        with run_lock(run) if main_process and run.config_path.is_file() else nullcontext():
            result = train_iteration(args.run_dir, args.iteration)
    except (UserError, ConfigError, RunDirError, ValueError) as exc:
        if args.debug:
            raise
        print(f"ccsr.train_cli: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        Ranks.close()
    logger.info("iteration %d: LoRA in %s (%d steps)", args.iteration, result.lora_dir, result.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
