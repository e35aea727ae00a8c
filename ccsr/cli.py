"""Command line: ``ccsr run | daemon | status | generate | validate``.

Bad input of any kind (``ccsr.inputs.UserError``, a ``ConfigError``, a ``RunDirError``) ends in one line on
stderr naming the problem and the fix, exit code 2, no traceback (``--debug`` shows it), and nothing written:
every check (``ccsr.inputs``) runs before the run directory is created. A full disk ends the same way (one
line, exit code 1); atomic commits leave no temp or torn files behind, so the same command continues once
there is space again.

Nothing here imports a hub library (huggingface_hub, transformers, diffusers, ultralytics) at module level:
the offline switches are read by those libraries at import time and are set only once the config is known.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import sys
from contextlib import ExitStack
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import NoReturn

from ccsr.config import Config, ConfigError
from ccsr.config_files import load_config, save_config
from ccsr.distributed import Ranks
from ccsr.inputs import UserError, check_config, check_models, set_offline
from ccsr.rundir import RunDir, RunDirError, run_lock, slugify, validate_class_name
from ccsr.trust import TRUST_FLAG, check_resumed, read_run_config

logger = logging.getLogger("ccsr")

EXIT_BAD_INPUT = 2
EXIT_DISK_FULL = 1


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line too (usage text stays behind ``--help``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"ccsr: error: {message} (see {self.prog} --help)\n")


class _RunLogHandler(RotatingFileHandler):
    """The run's log file. A failed write (a full disk) stays quiet: the next commit reports it as one line,
    instead of logging printing a traceback for every log record."""

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handleError(record)


def _setup_logging(level: int, log_file: Path | None = None, brief: bool = False) -> None:
    """stderr and the run's log file get the records at ``level`` and above; with ``brief`` the terminal shows
    only ccsr's lines for it and warnings (``ccsr.console``). Python warnings are logged like the rest."""
    from ccsr.console import FULL_FORMAT, ConsoleHandler

    root = logging.getLogger()
    root.setLevel(level)
    _remove_log_handlers()
    handler = ConsoleHandler(brief, sys.stderr)
    handler._ccsr = True
    root.addHandler(handler)
    if log_file is not None:
        fh = _RunLogHandler(log_file, maxBytes=10_000_000, backupCount=3, encoding="utf-8")
        fh.setFormatter(logging.Formatter(FULL_FORMAT))
        fh._ccsr = True
        root.addHandler(fh)
    logging.captureWarnings(True)
    for noisy in ("httpx", "urllib3", "PIL", "matplotlib", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _log_options(args) -> dict:
    """``_setup_logging``'s level and whether the terminal is brief, from ``--debug`` and ``--verbose``."""
    verbose = getattr(args, "verbose", False)
    return {"level": logging.DEBUG if args.debug else logging.INFO, "brief": not (args.debug or verbose)}


def _remove_log_handlers() -> None:
    """Undo ``_setup_logging`` when ``main`` returns, for in-process callers (tests, notebooks): the log file
    belongs to one run and the captured sys.stderr may be closed by the time anything logs again."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_ccsr", False)]:
        root.removeHandler(handler)
        if isinstance(handler, logging.FileHandler):
            handler.close()
    logging.captureWarnings(False)


def _load(args) -> Config:
    class_name = getattr(args, "class_name", None)
    if class_name is not None:
        class_name = validate_class_name(class_name)  # kept as given; its slug only names the folder
    iterations = getattr(args, "iterations", None)
    if iterations is not None and iterations <= 0:
        raise UserError(f"--iterations must be > 0, got {iterations}; pass e.g. --iterations 1")
    cfg = load_config(args.config, args.set or [], class_name=class_name)
    if iterations is not None:
        cfg.iterations = iterations
    set_offline(cfg)
    return cfg


def _start_ranks(cfg: Config) -> Ranks:
    """This process's rank under a launcher (``ccsr.distributed``), its process group joined."""
    try:
        ranks = Ranks.from_env()
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if ranks.world > 1:
        if cfg.judge.backend == "vllm":
            raise UserError(
                "judge.backend vllm runs one engine per process on the first GPU; under a launcher use the "
                "transformers judge, or run one process with vLLM's own tensor parallelism"
            )
        from ccsr.devices import keep_cpu_threads, torch_device

        # ultralytics runs a process-group barrier when it is first imported inside one (for its settings
        # file), which would pair with another collective of the loop's; imported before the group exists, not.
        with keep_cpu_threads():
            import ultralytics  # noqa: F401
        ranks.start(cpu=torch_device(cfg).type == "cpu")
    return ranks


def _run_dir(args, cfg: Config) -> Path:
    return Path(args.run_dir) if args.run_dir else Path("runs") / slugify(cfg.class_name)


def _open_run(args, cfg: Config) -> RunDir:
    run = RunDir(_run_dir(args, cfg))
    run.check_writable()
    return run


def _resume_config(run: RunDir, cfg: Config, trust: bool = False) -> Config:
    """The saved config of a run wins (so a resumed run stays the same run); only the budget may change.
    Its code, model paths and seed must repeat the user's (``ccsr.trust``)."""
    if not run.config_path.exists():
        save_config(cfg, run.config_path)
        return cfg
    saved = load_config(run.config_path)
    if saved.class_name != cfg.class_name:
        raise UserError(
            f"{run.root} holds a run for class {saved.class_name!r}, not {cfg.class_name!r}; pick another --run-dir"
        )
    check_resumed(saved, cfg, run.config_path, trust)
    diff = _diff(saved.to_dict(), cfg.to_dict())
    diff.discard("iterations")
    if diff:
        logger.warning(
            "resuming with the run's saved config; ignoring changed keys: %s", ", ".join(sorted(diff))
        )
    saved.iterations = cfg.iterations
    set_offline(saved)
    if diff:
        check_config(saved)  # the run's own models and files, where they are not the ones just checked
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
    cfg = _load(args)
    if not cfg.class_name:
        raise UserError("no class: pass --class NAME (e.g. --class giraffe)")
    check_config(cfg)
    ranks = _start_ranks(cfg)
    run = RunDir(_run_dir(args, cfg))
    with ExitStack() as held:
        held.callback(ranks.close)  # last out: after the lock and everything else is released
        # The main process holds the run's lock and writes its config; the other ranks then read it.
        error = None
        if ranks.is_main:
            try:
                run = _open_run(args, cfg)
                held.enter_context(run_lock(run))
                cfg = _resume_config(run, cfg, args.trust_run_config)
                if ranks.world > 1:
                    # Embedded models are built by the main process before the others need them: a model's
                    # save_pretrained on a rank other than 0 of a process group writes no weights.
                    from ccsr.models import build_embedded

                    build_embedded(cfg)
            except (UserError, RunDirError) as exc:
                error = exc
        if ranks.any(error is not None):
            raise error or UserError(
                f"{run.root}: the main process could not open the run (its error says why)"
            )
        if not ranks.is_main:
            cfg = _resume_config(run, cfg, args.trust_run_config)
        if ranks.is_main:
            _setup_logging(**_log_options(args), log_file=run.log_path)
        else:  # the other ranks: warnings only, and no second writer of the run's log file
            _setup_logging(**(_log_options(args) | {"level": logging.WARNING}))
        from ccsr.console import CONSOLE
        from ccsr.distributed import StopRequested
        from ccsr.loop import Loop

        stop = {"flag": False}
        stop_file = run.stop_path

        def request_stop(signum, frame):
            logger.info("signal %d: stopping after the current unit", signum, extra=CONSOLE)
            stop["flag"] = True

        if daemon:
            signal.signal(signal.SIGTERM, request_stop)
            signal.signal(signal.SIGINT, request_stop)
        loop = Loop(
            cfg,
            run,
            should_stop=lambda: stop["flag"] or stop_file.exists(),
            backoff_seconds=60.0 if daemon else 0.0,
            ranks=ranks,
        )
        if ranks.is_main:
            run.event(
                "start", pid=os.getpid(), iterations=cfg.iterations, daemon=daemon, processes=ranks.world
            )
        logger.info(
            "run %s: class %r, %d iterations", run.root, cfg.class_name, cfg.iterations, extra=CONSOLE
        )
        try:
            loop.run_iterations(cfg.iterations)
        except StopRequested:
            if ranks.is_main:
                by_file = stop_file.exists()
                if by_file:
                    stop_file.unlink()  # consumed: the next start runs
                run.event("stopped", reason="stop file" if by_file else "signal")
                logger.info("stopped cleanly; run the same command again to continue", extra=CONSOLE)
            return 0
        if ranks.is_main:
            run.event("finished", iterations=cfg.iterations)
    if not ranks.is_main:
        return 0
    from ccsr.report import REPORT_NAME
    from ccsr.status import format_status, run_status

    try:
        print(format_status(run_status(run.root)))  # after the lock is released: the process is done
    except RunDirError as exc:  # a damaged line the loop skipped and redid: the run itself is fine
        logger.warning("%s", exc)
    if (run.root / REPORT_NAME).is_file():
        print(f"report   {run.root / REPORT_NAME}")
    return 0


def cmd_status(args) -> int:
    from ccsr.status import find_runs, format_status, format_summary, run_status

    runs = find_runs(args.run_dir)
    if not runs:
        raise UserError(
            f"{args.run_dir} is not a ccsr run directory and holds none; give runs/<class> or runs/"
        )
    statuses = [run_status(r) for r in runs]
    single = len(runs) == 1 and Path(args.run_dir).resolve() == runs[0].resolve()
    if args.json:
        print(json.dumps(statuses[0] if single else statuses, indent=2, ensure_ascii=False))
    else:
        print(format_status(statuses[0]) if single else format_summary(statuses))
    return 0


def _output_paths(out: Path, num: int) -> list[Path]:
    """Where ``ccsr generate`` writes; its folder is made (and checked) before any model is loaded."""
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file path such as {out / 'image.png'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"--out {out}: cannot create its folder ({exc.strerror}); pick another path"
        ) from None
    if not os.access(out.parent, os.W_OK):
        raise UserError(f"--out {out}: folder {out.parent} is not writable; pick another path")
    if num == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}") for i in range(num)]


def cmd_generate(args) -> int:
    if args.run:
        run_dir = Path(args.run)
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"--run {run_dir}: not a ccsr run directory (no config.yaml)")
        if not args.config:
            read_run_config(run_dir, None, [], args.trust_run_config)
        args.config = args.config or str(run_dir / "config.yaml")
    elif not args.config:
        raise UserError("give --config CONFIG, or --run RUN_DIR to draw with that run's champion")
    cfg = _load(args)
    check_models(cfg)
    scales = args.scale
    if args.lora is None and args.run:
        from ccsr.gate import current_champion

        args.lora, champion_scale = current_champion(RunDir(args.run))
        scales = scales or [champion_scale]
        logging.getLogger("ccsr").info("champion: %s at scale %g", args.lora or "base model", scales[0])
    scales = scales or [1.0]
    if not args.prompt.strip():
        raise UserError("--prompt is empty; give the text to draw, e.g. --prompt 'a giraffe'")
    if any(not 0.0 <= sc <= 1.0 for sc in scales):  # NaN fails the comparison too
        raise UserError(f"--scale must be within [0, 1], got {scales}")
    if args.num <= 0:
        raise UserError(f"--num must be > 0, got {args.num}")
    if args.lora:
        from ccsr import lora

        lora.check(args.lora, cfg.generator.model, cfg.model_cache)
    paths = _output_paths(Path(args.out), args.num)
    _setup_logging(**_log_options(args))
    from ccsr.backends import load_backend
    from ccsr.rundir import atomic_save_image

    gen = load_backend("generator", cfg)
    seeds = [args.seed + i for i in range(args.num)]
    rows = [gen.images([args.prompt] * args.num, seeds, lora=args.lora, scale=sc) for sc in scales]
    for i, path in enumerate(paths):
        # Several scales: one side-by-side strip per seed, scales left to right.
        atomic_save_image(path, rows[0][i] if len(scales) == 1 else _strip([row[i] for row in rows]))
        print(path)
    return 0


def _strip(images):
    from PIL import Image

    w, h = images[0].size
    out = Image.new("RGB", (w * len(images), h))
    for i, image in enumerate(images):
        out.paste(image, (i * w, 0))
    return out


def cmd_eval(args) -> int:
    from ccsr.evaluation import evaluate
    from ccsr.rundir import atomic_write_json

    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir}: not a ccsr run directory (no config.yaml)")
    cfg = read_run_config(run_dir, args.config, args.set or [], args.trust_run_config)
    set_offline(cfg)
    run = RunDir(run_dir)
    trained = [k for k in run.iterations() if run.lora_file(k).is_file()]
    if not trained:
        raise UserError(f"{run_dir}: no iteration has a LoRA yet")
    k = args.iteration if args.iteration is not None else trained[-1]
    if k not in trained:
        raise UserError(f"--iteration {k}: no LoRA for that iteration (iterations with one: {trained})")
    scales = args.scales or cfg.evaluator.scales
    if any(not 0.0 <= sc <= 1.0 for sc in scales):  # NaN fails the comparison too
        raise UserError(f"--scales must be within [0, 1], got {scales}")
    if not any(scales):
        raise UserError(
            f"--scales {' '.join(f'{sc:g}' for sc in scales)} evaluates only the base model, not iteration "
            f"{k}'s LoRA; give a scale above 0, e.g. --scales 0.5 1"
        )
    check_models(cfg)
    from ccsr import lora

    lora.check(run.lora_dir(k), cfg.generator.model, cfg.model_cache)
    _setup_logging(**_log_options(args))
    with run_lock(run):
        tag = "-".join(f"{sc:g}" for sc in sorted({0.0, *scales}))
        out_dir = run.iteration_dir(k) / f"eval-scales-{tag}"
        summary = evaluate(cfg, run, k, scales, out_dir)
        atomic_write_json(out_dir / "eval.json", summary)  # the loop's eval.json and gate stay untouched
    print(json.dumps(summary, indent=2))
    print(f"written: {out_dir / 'eval.json'}", file=sys.stderr)
    return 0


def cmd_report(args) -> int:
    from ccsr.report import write_report

    if not (Path(args.run_dir) / "config.yaml").is_file():
        raise UserError(f"{args.run_dir}: not a ccsr run directory (no config.yaml)")
    print(write_report(Path(args.run_dir)))
    return 0


def cmd_export(args) -> int:
    from ccsr import lora

    info = lora.check(args.lora)
    if info.kohya:
        raise UserError(f"{info.path}: already in kohya format; nothing to convert")
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file path such as {out / 'lora_kohya.safetensors'}")
    try:
        print(lora.export_kohya(info.path, Path(args.out)))
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return 0


def cmd_validate(args) -> int:
    cfg = _load(args)
    check_config(cfg)
    print(f"{args.config}: ok")
    return 0


# The end of every --help: what a command is for, shown by a command line that works as written (from the
# repository root, or anywhere for the shipped configs); tests parse every ``ccsr ...`` line of these.
EXAMPLES = {
    "ccsr": """examples (check the config, two iterations on the embedded tiny models, what the run holds):
  ccsr validate --config configs/tiny.yaml
  ccsr run --config configs/tiny.yaml --class giraffe --iterations 2
  ccsr status runs/giraffe""",
    "run": """example (two iterations on the embedded tiny models: CPU, no download; run it again to continue):
  ccsr run --config configs/tiny.yaml --class giraffe --iterations 2""",
    "daemon": """example (the paper's setup on a GPU; `touch runs/giraffe/STOP` ends it after the current unit):
  ccsr daemon --config configs/paper.yaml --class giraffe --run-dir runs/giraffe""",
    "status": """examples (one run; a table of every run under runs/, as JSON):
  ccsr status runs/giraffe
  ccsr status runs --json""",
    "generate": """example (four images, seeds 0-3, with the run's champion LoRA at its best scale):
  ccsr generate --run runs/giraffe --prompt "a giraffe in the snow" --num 4 --out giraffe.png""",
    "validate": """example (a config with an override, checked without loading a model):
  ccsr validate --config configs/tiny.yaml --set generator.steps=4""",
    "eval": """example (iteration 2's LoRA at three scales; scale 0, the base model, is always added):
  ccsr eval runs/giraffe --iteration 2 --scales 0.4 0.7 1""",
    "report": """example (then open runs/giraffe/report.html in a browser):
  ccsr report runs/giraffe""",
    "export": """example (iteration 1's LoRA for ComfyUI or A1111):
  ccsr export runs/giraffe/iterations/001/lora --format kohya --out giraffe.safetensors""",
}


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter  # keeps the examples' lines as written
    parser = _Parser(
        prog="ccsr",
        description="Class-conditional self-rewarding loop",
        epilog=EXAMPLES["ccsr"],
        formatter_class=raw,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show every log record, not one line a stage"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add_command(name, help_text):
        return sub.add_parser(
            name, help=help_text, description=help_text, epilog=EXAMPLES[name], formatter_class=raw
        )

    def add_debug(p):
        # SUPPRESS: a subcommand's default must not overwrite ``ccsr --debug <command>``.
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        p.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )

    def add_trust(p):
        p.add_argument(
            TRUST_FLAG,
            dest="trust_run_config",
            action="store_true",
            help="accept the run's own backends, model paths and seed where they differ from your config "
            "(docs/trust.md)",
        )

    def add_config(p, required=True):
        p.add_argument(
            "--config", required=required, help="YAML config (configs/tiny.yaml, configs/paper.yaml)"
        )
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
        add_debug(p)

    for name, help_text in (
        ("run", "run or resume the loop in the foreground"),
        ("daemon", "run until the budget, SIGTERM/SIGINT or a STOP file in the run dir"),
    ):
        p = add_command(name, help_text)
        add_config(p)
        p.add_argument("--class", dest="class_name", required=True, help="object class, e.g. giraffe")
        p.add_argument("--run-dir", help="default: runs/<class-slug>")
        p.add_argument("--iterations", type=int, help="iteration budget (overrides the config)")
        add_trust(p)

    p = add_command("status", "what a run directory holds")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true")
    add_debug(p)

    p = add_command("generate", "draw images with the base model, a LoRA or a run's champion")
    add_config(p, required=False)
    p.add_argument(
        "--run", help="a run directory: its config, and its champion LoRA when --lora is not given"
    )
    p.add_argument("--prompt", required=True)
    p.add_argument("--lora", help="LoRA folder (pytorch_lora_weights.safetensors) or .safetensors file")
    p.add_argument("--scale", type=float, nargs="+", help="LoRA scale(s); several give a side-by-side strip")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num", type=int, default=1)
    p.add_argument("--out", required=True, help="output PNG path")
    add_trust(p)

    p = add_command("validate", "check a config without running anything")
    add_config(p)

    p = add_command("eval", "evaluate an iteration's LoRA again, at chosen scales")
    p.add_argument("run_dir")
    p.add_argument("--iteration", type=int, help="default: the newest iteration with a LoRA")
    p.add_argument("--scales", type=float, nargs="+", help="LoRA scales (0 is always added: the base)")
    p.add_argument("--config", help="your own config: the run's backends and model paths must repeat it")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help=argparse.SUPPRESS)
    add_trust(p)
    add_debug(p)

    p = add_command("report", "write RUN_DIR/report.html (static, opens from disk)")
    p.add_argument("run_dir")
    add_debug(p)

    p = add_command("export", "convert a LoRA for other tools")
    p.add_argument("lora", help="LoRA folder (pytorch_lora_weights.safetensors)")
    p.add_argument("--format", choices=["kohya"], default="kohya", help="kohya: for ComfyUI / A1111")
    p.add_argument("--out", required=True, help="output .safetensors file")
    add_debug(p)
    return parser


def _disk_full(exc: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT error behind ``exc``, if any (libraries such as torch wrap it in their own error)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return exc
        if "No space left on device" in str(exc):
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        exc = exc.__cause__ or exc.__context__
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {
        "run": cmd_run,
        "daemon": lambda a: cmd_run(a, daemon=True),
        "status": cmd_status,
        "generate": cmd_generate,
        "validate": cmd_validate,
        "eval": cmd_eval,
        "report": cmd_report,
        "export": cmd_export,
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
    except Exception as exc:
        full = _disk_full(exc)
        if full is None or args.debug:
            raise
        where = f" ({full.filename})" if full.filename else ""
        print(
            f"ccsr: error: disk full while writing{where}: {full.strerror}; free some space and run the same "
            "command again to continue (committed work is kept)",
            file=sys.stderr,
        )
        return EXIT_DISK_FULL
    finally:
        _remove_log_handlers()


if __name__ == "__main__":
    sys.exit(main())
