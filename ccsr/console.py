"""What a person reads in the terminal: a progress bar while a stage runs, then one line with its figures.

A log record meant for the terminal carries ``extra=CONSOLE``. By default the commands show those records and
every warning on stderr, and nothing of the libraries' INFO records; the run's log file keeps every record at
INFO and above. ``--verbose`` shows every INFO record in the terminal too, ``--debug`` the DEBUG ones as well.

Progress bars are made by ``bar``: it honours ``TQDM_DISABLE`` (tqdm reads that variable only for bars made
without an explicit ``disable=``), and a finished bar leaves no line behind, the stage's line says what it did.
Log records are written above a running bar (``tqdm.write``), so neither tears the other. ``stage_line`` is the
loop's line for a finished stage.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tqdm.auto import tqdm

CONSOLE = {"console": True}
FULL_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def bars_disabled() -> bool:
    """True when the environment turns progress bars off: ``TQDM_DISABLE`` set to anything but 0/false/no."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no", "off")


def bar(iterable: Iterable | None = None, *, disable: bool = False, **kwargs) -> tqdm:
    """A tqdm progress bar that is off under ``TQDM_DISABLE`` and vanishes when done."""
    from tqdm.auto import tqdm

    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, disable=disable or bars_disabled(), **kwargs)


def duration(seconds: float) -> str:
    """``12.3 s``, ``2 min 5 s``, ``1 h 4 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    return f"{minutes // 60} h {minutes % 60} min"


def stage_line(stage: str, info: dict, seconds: float, root: Path) -> str:
    """The terminal's line for a finished stage (``info``: what the stage recorded): its figures and time."""
    took = duration(seconds)
    if stage == "prompts":
        dropped = [f"{n} {why.replace('_', '-')}" for why, n in info.get("dropped", {}).items() if n]
        calls = info.get("attempts", 0)
        text = f"prompts: {info['count']} written in {took} ({calls} LLM call{'' if calls == 1 else 's'}"
        return text + (f"; dropped {', '.join(dropped)})" if dropped else ")")
    if stage == "candidates":
        lora = Path(info["lora"]) if info.get("lora") else None
        if lora is not None and lora.is_relative_to(root):
            lora = lora.relative_to(root)
        model = f"LoRA {lora}" if lora else "the base model"
        return f"candidates: {info['count']} images in {took} (with {model})"
    if stage == "judge":
        text = f"judge: {info['count']} images scored in {took}"
        if info.get("mean_score") is not None:
            text += f", mean score {info['mean_score']:.2f}"
        return text + (f", {info['nan_answers']} answers unreadable" if info.get("nan_answers") else "")
    if stage == "filter":
        prompts = info.get("prompts", 0)
        kept = prompts - info.get("prompts_without_pair", 0)
        text = f"filter: {kept} of {prompts} prompts kept, {info['count']} pairs"
        if info.get("preferences"):
            text += f", {info['preferences']} preference pairs"
        return f"{text} in {took}"
    if stage == "train":
        if info.get("skipped"):
            return f"train: skipped, {info.get('reason')}"
        data = (
            f"{info['preferences']} preference pairs" if "preferences" in info else f"{info['pairs']} pairs"
        )
        return f"train: {info['steps']} steps on {data}, loss {info['final_loss']:.4f} in {took}"
    if stage == "eval":
        if info.get("skipped"):
            return f"eval: skipped, {info.get('reason')}; gate: rejected"
        clip = ""
        if info.get("clip_score") is not None and info.get("base_clip_score") is not None:
            clip = f", CLIP {info['clip_score']:.2f} (base {info['base_clip_score']:.2f})"
        verdict = info["gate"]
        return (
            f"eval: best scale {info['best_scale']:g}, win-rate {info['win_rate']:.2f}{clip} in {took}; "
            f"gate: {'accepted' if verdict['accepted'] else 'rejected'} ({verdict['reason']})"
        )
    return f"{stage}: done in {took}"


class _BriefFormatter(logging.Formatter):
    """A console line as it is ("iteration 1 · judge: ..."); a warning or an error says so. No time, logger
    name or traceback: the log file has them."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f"error: {message}"
        if record.levelno >= logging.WARNING:
            return f"warning: {message}"
        return message


def _brief(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or bool(getattr(record, "console", False))


class ConsoleHandler(logging.StreamHandler):
    """The terminal's handler (stderr unless given a stream). ``brief``: the records marked ``CONSOLE`` and
    warnings only, as plain lines; otherwise every record it is given, with time, level and logger."""

    def __init__(self, brief: bool, stream=None):
        super().__init__(stream)
        if brief:
            self.addFilter(_brief)
            self.setFormatter(_BriefFormatter())
        else:
            self.setFormatter(logging.Formatter(FULL_FORMAT, "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)  # clears any bar, writes, draws the bar again
            self.flush()
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - logging's own contract: a failed write is reported, not raised
            self.handleError(record)
