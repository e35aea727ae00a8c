"""The run directory: the single source of truth of a run.

Layout (``runs/<class-slug>/``)::

    config.yaml                 resolved config (written once, when the run starts)
    events.jsonl                append-only event log (stage start/end, skips, warnings)
    ccsr.log                    log file
    run.lock                    held by the one process working on this run
    validation_prompts.jsonl    held-out prompts, frozen at the start, never trained on
    iterations/001/
        prompts.jsonl candidates.jsonl judgments.jsonl detections.jsonl pairs.jsonl
        candidates/*.png  dataset/ (image folder + metadata.jsonl)  lora/  eval/  eval.json
        stages.json             stages finished, with their wall time

Every file is committed atomically (temp name, fsync, rename) or appended a whole line at a time; a torn last
line of a JSON-lines file (a crash mid-append) is ignored on read and cut off before the next append.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import unicodedata
from collections.abc import Iterable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

STAGES = ("prompts", "candidates", "judge", "filter", "train", "eval")


class RunDirError(ValueError):
    """A problem with a run directory or a class name; the message says what and how to fix it."""


def validate_class_name(name: str) -> str:
    """Return the stripped class name or raise RunDirError with the reason."""
    if name is None or not name.strip():
        raise RunDirError("class name is empty: pass --class NAME, e.g. --class giraffe")
    name = name.strip()
    if len(name) > 100:
        raise RunDirError(f"class name is {len(name)} characters long; use at most 100")
    # Cs: lone surrogates, what Python makes of command-line bytes that are not valid UTF-8.
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp") for ch in name):
        raise RunDirError(
            "class name contains control or undecodable characters; use plain words such as 'giraffe'"
        )
    if "/" in name or "\\" in name:
        raise RunDirError(f"class name {name!r} contains a path separator; use plain words such as 'giraffe'")
    if name in (".", "..") or set(name) <= {"."}:
        raise RunDirError(f"class name {name!r} is not a name; use plain words such as 'giraffe'")
    return name


def slugify(name: str) -> str:
    """A filesystem-safe folder name for a class; non-ASCII names keep their letters (NFKC, lowercased)."""
    name = validate_class_name(name)
    text = unicodedata.normalize("NFKC", name).lower()
    slug = re.sub(r"[^\w]+", "-", text, flags=re.UNICODE).strip("-_")
    if not slug:
        # A stable digest, not hash(): str hashes change per process and the default run dir must not.
        import hashlib

        slug = "class-" + hashlib.sha256(name.encode("utf-8")).hexdigest()[:10]
    return slug[:80]


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def atomic_save_image(path: Path, image) -> None:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def read_json(path: Path, default: Any = None) -> Any:
    """A JSON file, or ``default`` when it is missing or damaged (a damaged file is never trusted)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default
    except (json.JSONDecodeError, UnicodeDecodeError):
        logger.warning("%s is damaged; ignoring it (the work it records will be redone)", path)
        return default


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All intact records. A torn last line (a crash mid-append) or a damaged line is skipped with a warning;
    the loop then redoes the units whose records are missing."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    lines = path.read_bytes().split(b"\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        complete = i < len(lines) - 1
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            obj = None
        if not isinstance(obj, dict):
            if complete:
                logger.warning("%s: line %d is damaged; skipping it", path, i + 1)
            continue
        if complete:
            records.append(obj)
    return records


def sha256_file(path: Path) -> str | None:
    import hashlib

    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def append_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Append whole lines and fsync; cut a torn tail left by a crash first so the file stays parsable."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            with open(path, "r+b") as f:
                f.truncate(cut)
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    committed = path.stat().st_size if path.exists() else 0
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        # A unit is all of its records or none: a write cut short (ENOSPC) may hold whole lines of some of
        # them, which readers would take as committed. Shrinking a file needs no free space.
        with open(path, "r+b") as f:
            f.truncate(committed)
        raise


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


class RunDir:
    """Paths and small bookkeeping of one run directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # --- paths ---------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def events_path(self) -> Path:
        return self.root / "events.jsonl"

    @property
    def log_path(self) -> Path:
        return self.root / "ccsr.log"

    @property
    def lock_path(self) -> Path:
        return self.root / "run.lock"

    @property
    def validation_path(self) -> Path:
        return self.root / "validation_prompts.jsonl"

    @property
    def encode_cache(self) -> Path:
        return self.root / "cache" / "encodings"

    def iteration_dir(self, k: int) -> Path:
        return self.root / "iterations" / f"{k:03d}"

    def files(self, k: int) -> dict[str, Path]:
        d = self.iteration_dir(k)
        return {
            "prompts": d / "prompts.jsonl",
            "candidates": d / "candidates.jsonl",
            "judgments": d / "judgments.jsonl",
            "detections": d / "detections.jsonl",
            "pairs": d / "pairs.jsonl",
            "dataset": d / "dataset",
        }

    def lora_dir(self, k: int) -> Path:
        return self.iteration_dir(k) / "lora"

    def eval_path(self, k: int) -> Path:
        return self.iteration_dir(k) / "eval.json"

    # --- bookkeeping ---------------------------------------------------------------------------
    def iterations(self) -> list[int]:
        base = self.root / "iterations"
        if not base.is_dir():
            return []
        return sorted(int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit())

    def stages_done(self, k: int) -> dict[str, Any]:
        return read_json(self.iteration_dir(k) / "stages.json", default={}) or {}

    def is_done(self, k: int, stage: str) -> bool:
        return stage in self.stages_done(k)

    def mark_done(self, k: int, stage: str, **info: Any) -> None:
        done = self.stages_done(k)
        done[stage] = {"finished_at": time.time(), **info}
        atomic_write_json(self.iteration_dir(k) / "stages.json", done)

    def unmark(self, k: int, stages: Iterable[str]) -> None:
        done = self.stages_done(k)
        for stage in stages:
            done.pop(stage, None)
        atomic_write_json(self.iteration_dir(k) / "stages.json", done)

    def iteration_complete(self, k: int) -> bool:
        return all(s in self.stages_done(k) for s in STAGES)

    def event(self, kind: str, **fields: Any) -> None:
        append_jsonl(self.events_path, [{"time": round(time.time(), 3), "event": kind, **fields}])

    def clean_temp(self) -> int:
        """Remove temp files and folders (``.NAME.tmpPID``) left by a killed process; call with the lock held."""
        import shutil

        removed = 0
        for path in sorted(self.root.rglob(".*.tmp*"), key=lambda p: len(p.parts), reverse=True):
            if not re.search(r"\.tmp\d+$", path.name):
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed += 1
        if removed:
            logger.info("removed %d temporary files left by an interrupted process", removed)
        return removed

    def heartbeat(self, **where: Any) -> None:
        """Where the working process is, for ``ccsr status`` (pid, time, iteration, stage, unit)."""
        atomic_write_json(
            self.root / "heartbeat.json", {"pid": os.getpid(), "time": round(time.time(), 3), **where}
        )

    def check_writable(self) -> None:
        """Create the run directory and prove a file can be written there; on failure leave nothing behind."""
        missing = [p for p in (self.root, *self.root.parents) if not p.exists()]
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-test{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            for folder in missing:  # deepest first: only the folders this call made, and only if empty
                try:
                    folder.rmdir()
                except OSError:
                    break
            raise RunDirError(
                f"run directory {self.root} is not writable ({exc.strerror}); pick another --run-dir"
            ) from None

    def inside(self, path: Path) -> Path:
        """Refuse any path that would escape the run directory (names come from data, never trust them)."""
        resolved = Path(path).resolve()
        if not resolved.is_relative_to(self.root.resolve()):
            raise RunDirError(f"refusing to write outside the run directory: {path}")
        return resolved
