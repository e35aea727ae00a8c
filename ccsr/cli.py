"""Command line: ``ccsr run | daemon | status | generate | validate``.

Bad input of any kind ends in one line on stderr naming the problem and the fix, exit code 2, no traceback
(``--debug`` shows it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

from ccsr.config import Config, ConfigError, load_config, save_config
from ccsr.rundir import RunDir, RunDirError, slugify

logger = logging.getLogger("ccsr")

EXIT_BAD_INPUT = 2


class UserError(Exception):
    """Anything the user can fix; printed as one line."""


def _set_offline(cfg: Config) -> None:
    """Offline switches must be set before the hub libraries are imported (FIELD-NOTES)."""
    if cfg.offline:
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "YOLO_OFFLINE"):
            os.environ[var] = "1"
    os.environ.setdefault("YOLO_VERBOSE", "False")
    # Model-loading bars of the libraries drown ccsr's own per-stage bars.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _setup_logging(level: int, log_file: Path | None = None) -> None:
    root = logging.getLogger()
    root.setLevel(level)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    if not any(getattr(h, "_ccsr", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(fmt)
        handler._ccsr = True
        root.addHandler(handler)
    if log_file is not None:
        from logging.handlers import RotatingFileHandler

        fh = RotatingFileHandler(log_file, maxBytes=10_000_000, backupCount=3, encoding="utf-8")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(fh)
    for noisy in ("httpx", "urllib3", "PIL", "matplotlib", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def check_models(cfg: Config) -> None:
    """A model named by a path must exist; ids and ccsr-tiny/* names are resolved when used."""
    for section in ("prompter", "generator", "judge", "detector", "evaluator"):
        name = getattr(cfg, section).model
        looks_like_path = name.startswith(("/", "./", "../", "~")) or os.sep in name and Path(name).exists()
        if looks_like_path and not Path(name).expanduser().exists():
            raise UserError(f"{section}.model: folder {name} does not exist; give a local folder or a hub id")


def check_questions(cfg: Config) -> None:
    from ccsr.config import resolve_data_path
    from ccsr.judge import QuestionSet

    try:
        QuestionSet.load(resolve_data_path(cfg.judge.questions))
    except FileNotFoundError:
        raise UserError(f"judge.questions: file {cfg.judge.questions} not found") from None
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _load(args) -> Config:
    class_name = getattr(args, "class_name", None)
    if class_name is not None:
        try:
            class_name = slugify(class_name) and class_name.strip()
        except RunDirError as exc:
            raise UserError(str(exc)) from None
    cfg = load_config(args.config, args.set or [], class_name=class_name)
    if getattr(args, "iterations", None) is not None:
        if args.iterations <= 0:
            raise UserError("--iterations must be > 0")
        cfg.iterations = args.iterations
    _set_offline(cfg)
    return cfg


def _open_run(args, cfg: Config) -> RunDir:
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / slugify(cfg.class_name)
    run = RunDir(run_dir)
    run.check_writable()
    return run


def _resume_config(run: RunDir, cfg: Config) -> Config:
    """The saved config of a run wins (so a resumed run stays the same run); only the budget may change."""
    if not run.config_path.exists():
        save_config(cfg, run.config_path)
        return cfg
    saved = load_config(run.config_path)
    if saved.class_name != cfg.class_name:
        raise UserError(
            f"{run.root} holds a run for class {saved.class_name!r}, not {cfg.class_name!r}; pick another --run-dir"
        )
    diff = _diff(saved.to_dict(), cfg.to_dict())
    diff.discard("iterations")
    if diff:
        logger.warning(
            "resuming with the run's saved config; ignoring changed keys: %s", ", ".join(sorted(diff))
        )
    saved.iterations = cfg.iterations
    _set_offline(saved)
    return saved


def _diff(a: dict, b: dict, prefix: str = "") -> set[str]:
    out = set()
    for key in set(a) | set(b):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out |= _diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.add(prefix + key)
    return out


def cmd_run(args, daemon: bool = False) -> int:
    from filelock import FileLock, Timeout

    cfg = _load(args)
    if not cfg.class_name:
        raise UserError("no class: pass --class NAME (e.g. --class giraffe)")
    check_models(cfg)
    check_questions(cfg)
    run = _open_run(args, cfg)
    lock = FileLock(str(run.lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        pid = (run.root / "run.pid").read_text().strip() if (run.root / "run.pid").exists() else "?"
        raise UserError(
            f"{run.root} is in use by another ccsr process (pid {pid}); stop it or pick another --run-dir"
        ) from None
    try:
        (run.root / "run.pid").write_text(str(os.getpid()))
        cfg = _resume_config(run, cfg)
        _setup_logging(logging.DEBUG if args.debug else logging.INFO, run.log_path)
        from ccsr.loop import Loop, StopRequested

        stop = {"flag": False}
        stop_file = run.root / "STOP"

        def request_stop(signum, frame):
            logger.info("signal %d: stopping after the current unit", signum)
            stop["flag"] = True

        if daemon:
            signal.signal(signal.SIGTERM, request_stop)
            signal.signal(signal.SIGINT, request_stop)
        loop = Loop(cfg, run, should_stop=lambda: stop["flag"] or stop_file.exists())
        run.event("start", pid=os.getpid(), iterations=cfg.iterations, daemon=daemon)
        logger.info("run %s: class %r, %d iterations", run.root, cfg.class_name, cfg.iterations)
        try:
            loop.run_iterations(cfg.iterations)
        except StopRequested:
            by_file = stop_file.exists()
            if by_file:
                stop_file.unlink()  # consumed: the next start runs
            run.event("stopped", reason="stop file" if by_file else "signal")
            logger.info("stopped cleanly; run the same command again to continue")
            return 0
        run.event("finished", iterations=cfg.iterations)
        from ccsr.status import format_status, run_status

        print(format_status(run_status(run.root)))
        return 0
    finally:
        lock.release()


def cmd_status(args) -> int:
    from ccsr.status import find_runs, format_status, format_summary, run_status

    runs = find_runs(args.run_dir)
    if not runs:
        raise UserError(f"{args.run_dir} is not a ccsr run directory and holds none; give runs/<class> or runs/")
    statuses = [run_status(r) for r in runs]
    single = len(runs) == 1 and Path(args.run_dir).resolve() == runs[0].resolve()
    if args.json:
        print(json.dumps(statuses[0] if single else statuses, indent=2, ensure_ascii=False))
    else:
        print(format_status(statuses[0]) if single else format_summary(statuses))
    return 0


def cmd_generate(args) -> int:
    cfg = _load(args)
    check_models(cfg)
    if args.lora and not (Path(args.lora) / "pytorch_lora_weights.safetensors").is_file():
        raise UserError(f"--lora {args.lora}: no pytorch_lora_weights.safetensors in that folder")
    if args.num <= 0:
        raise UserError("--num must be > 0")
    _setup_logging(logging.DEBUG if args.debug else logging.INFO)
    from ccsr.generator import DiffusersGenerator

    gen = DiffusersGenerator(cfg)
    seeds = [args.seed + i for i in range(args.num)]
    images = gen.images([args.prompt] * args.num, seeds, lora=args.lora, scale=args.scale)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from ccsr.rundir import atomic_save_image

    for i, image in enumerate(images):
        path = out if args.num == 1 else out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}")
        atomic_save_image(path, image)
        print(path)
    return 0


def cmd_validate(args) -> int:
    cfg = _load(args)
    check_models(cfg)
    check_questions(cfg)
    print(f"{args.config}: ok")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ccsr", description="Class-conditional self-rewarding loop")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_config(p, required=True):
        p.add_argument(
            "--config", required=required, help="YAML config (configs/tiny.yaml, configs/paper.yaml)"
        )
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
        p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    for name, help_text in (
        ("run", "run or resume the loop in the foreground"),
        ("daemon", "run until the budget, SIGTERM/SIGINT or a STOP file in the run dir"),
    ):
        p = sub.add_parser(name, help=help_text)
        add_config(p)
        p.add_argument("--class", dest="class_name", required=True, help="object class, e.g. giraffe")
        p.add_argument("--run-dir", help="default: runs/<class-slug>")
        p.add_argument("--iterations", type=int, help="iteration budget (overrides the config)")

    p = sub.add_parser("status", help="what a run directory holds")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    p = sub.add_parser("generate", help="draw images with the base model or a LoRA")
    add_config(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--lora", help="folder holding pytorch_lora_weights.safetensors")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num", type=int, default=1)
    p.add_argument("--out", required=True, help="output PNG path")

    p = sub.add_parser("validate", help="check a config without running anything")
    add_config(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {
        "run": cmd_run,
        "daemon": lambda a: cmd_run(a, daemon=True),
        "status": cmd_status,
        "generate": cmd_generate,
        "validate": cmd_validate,
    }
    try:
        return handlers[args.command](args)
    except (UserError, ConfigError, RunDirError) as exc:
        if args.debug:
            raise
        print(f"ccsr: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("ccsr: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
