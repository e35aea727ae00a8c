"""The run directory: the single source of truth of a run (its layout: docs/design.md).

This module holds its paths (``RunDir``), the run lock, the class-name rules and the file primitives every
writer uses: a file is committed atomically (temp name, fsync, rename) or a JSON-lines file grows a whole
line at a time; a torn last line (a crash mid-append) is ignored on read and cut off before the next append.
The typed records written into it are in ``ccsr.records``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import unicodedata
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

STAGES = ("prompts", "candidates", "judge", "filter", "train", "eval")
# diffusers' name for a LoRA's weights file (``diffusers.loaders.lora_base.LORA_WEIGHT_NAME_SAFE``; a test
# checks they agree). Spelled here so that reading a run directory never imports diffusers.
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


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


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """The one way a file is committed: the caller writes a temp path (``.NAME.tmpPID`` beside ``path``),
    which is fsynced and renamed over ``path`` when the block ends without error, and removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def atomic_save_image(path: Path, image) -> None:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def atomic_save_tensors(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file, committed like every other file (tensors are moved to the CPU, made contiguous)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


# Why a record is unreadable, when a strict reader (``ccsr status``) refuses it.
DAMAGED = "damaged, or written by another ccsr version"


def _read_bytes(path: Path, strict: bool) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        if not strict or isinstance(exc, FileNotFoundError):
            raise
        raise RunDirError(
            f"{path}: cannot be read ({exc.strerror}); fix its permissions, or move it out of the run directory"
        ) from None


def read_json(path: Path, default: Any = None, strict: bool = False) -> Any:
    """A JSON file, or ``default`` when it is missing. A damaged file is never trusted: ``default`` with a
    warning, or with ``strict`` a RunDirError naming the file."""
    try:
        return json.loads(_read_bytes(Path(path), strict).decode("utf-8"))
    except FileNotFoundError:
        return default
    except (json.JSONDecodeError, UnicodeDecodeError):
        if strict:
            raise RunDirError(
                f"{path}: not valid JSON ({DAMAGED}); repair the file or move it out of the run directory"
            ) from None
        logger.warning("%s is damaged; ignoring it (the work it records will be redone)", path)
        return default


def read_jsonl(path: Path, strict: bool = False) -> list[dict[str, Any]]:
    """All intact records. A torn last line (a crash mid-append) is skipped: the next append cuts it off. A
    damaged line elsewhere is skipped with a warning, the loop then redoes the units whose records are
    missing; with ``strict`` it raises RunDirError naming the line."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    lines = _read_bytes(path, strict).split(b"\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        complete = i < len(lines) - 1
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            obj = None
        if not isinstance(obj, dict):
            if complete and strict:
                raise RunDirError(
                    f"{path}: line {i + 1} is not a JSON object ({DAMAGED}); repair or delete that line "
                    "(ccsr run skips it)"
                )
            if complete:
                logger.warning("%s: line %d is damaged; skipping it", path, i + 1)
            continue
        if complete:
            records.append(obj)
    return records


def sha256_file(path: Path) -> str | None:
    """Hex sha256 of a file's bytes, read in blocks; None when the file is missing."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except FileNotFoundError:
        return None
    return digest.hexdigest()


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


# --- the run lock -----------------------------------------------------------------------------------------


@contextmanager
def run_lock(run: RunDir) -> Iterator[None]:
    """One process per run directory. An OS file lock dies with its process, so a crash leaves no stale lock;
    the holder's pid is written beside it so a refused second process can name it."""
    from filelock import FileLock, Timeout

    run.root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(run.lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        pid = run.pid_path.read_text().strip() if run.pid_path.exists() else "?"
        raise RunDirError(
            f"{run.root} is in use by another ccsr process (pid {pid}); stop it or pick another --run-dir"
        ) from None
    try:
        run.pid_path.write_text(str(os.getpid()))
        yield
    finally:
        lock.release()


def is_locked(run: RunDir) -> bool:
    """True while some process holds the run lock."""
    from filelock import FileLock, Timeout

    if not run.lock_path.exists():
        return False
    lock = FileLock(str(run.lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False


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
    def pid_path(self) -> Path:
        return self.root / "run.pid"

    @property
    def heartbeat_path(self) -> Path:
        return self.root / "heartbeat.json"

    @property
    def stop_path(self) -> Path:
        """A file of this name asks the working process to stop at the next unit boundary."""
        return self.root / "STOP"

    @property
    def champion_path(self) -> Path:
        return self.root / "champion.json"

    @property
    def validation_path(self) -> Path:
        return self.root / "validation_prompts.jsonl"

    @property
    def encode_cache(self) -> Path:
        """Latent distributions and caption embeddings of training images, shared by all iterations."""
        return self.root / "cache" / "encodings"

    @property
    def prior_cache(self) -> Path:
        """Base-model class images for the prior-preservation term, drawn once per run."""
        return self.root / "cache" / "prior"

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
            "preferences": d / "preferences.jsonl",
            "dataset": d / "dataset",
            "preference_dataset": d / "preference_dataset",
        }

    def candidates_dir(self, k: int) -> Path:
        return self.iteration_dir(k) / "candidates"

    def eval_dir(self, k: int) -> Path:
        """The loop's evaluation of iteration k: images per scale and ``records.jsonl``."""
        return self.iteration_dir(k) / "eval"

    def lora_dir(self, k: int) -> Path:
        return self.iteration_dir(k) / "lora"

    def lora_file(self, k: int) -> Path:
        return self.lora_dir(k) / LORA_WEIGHTS_NAME

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
        atomic_write_json(self.heartbeat_path, {"pid": os.getpid(), "time": round(time.time(), 3), **where})

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
        """``path``, resolved, if it lies inside the run directory; else RunDirError. Every writer and reader
        that builds a path from a run's records (prompt ids, record paths) goes through it: a run directory is
        data, and nothing in it may make ccsr touch a file outside it."""
        resolved = Path(path).resolve()
        if not resolved.is_relative_to(self.root.resolve()):
            raise RunDirError(f"refusing to write outside the run directory: {path}")
        return resolved
