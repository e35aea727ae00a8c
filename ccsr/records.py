"""The typed records of a run directory and the image-folder datasets built from them.

One dataclass per JSON-lines record kind. Readers get typed objects with the defaults declared here once;
extra fields in a file are ignored on read (a newer version may add some), a record missing a required field
is skipped with a warning and counted as damaged (the loop redoes its unit).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ccsr.rundir import DAMAGED, RunDirError, append_jsonl, read_jsonl, write_jsonl

if TYPE_CHECKING:
    from ccsr.rundir import RunDir

logger = logging.getLogger(__name__)


@dataclass
class Record:
    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PromptRecord(Record):
    """prompts.jsonl and validation_prompts.jsonl: one LLM-written prompt."""

    id: str
    prompt: str
    class_name: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        return cls(id=data["id"], prompt=data["prompt"], class_name=data.get("class"))

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "class": self.class_name, "prompt": self.prompt}


@dataclass
class Candidate(Record):
    """candidates.jsonl: one drawn image, regenerable from its seed, LoRA and scale."""

    prompt_id: str
    index: int
    seed: int
    path: str  # relative to the run directory
    sha256: str | None = None
    lora: str | None = None  # relative to the run directory; None: the base model
    scale: float = 0.0


@dataclass
class Judgment(Record):
    """judgments.jsonl: the judge's answers (dependency rule applied) and their eq. 1 score."""

    prompt_id: str
    index: int
    answers: list[str]
    score: int
    p_yes: list[float | None] | None = None


@dataclass
class Detection(Record):
    """detections.jsonl: the detector's confidence on one best-scored candidate."""

    prompt_id: str
    index: int
    score: int
    confidence: float


@dataclass
class Pair(Record):
    """pairs.jsonl: a prompt's optimal image, the training data of the LoRA."""

    prompt_id: str
    index: int
    prompt: str
    path: str
    score: int
    confidence: float


@dataclass
class Preference(Record):
    """preferences.jsonl: a winner and a strictly lower-scored loser of one prompt (Diffusion-DPO's data)."""

    prompt_id: str
    prompt: str
    winner_index: int
    loser_index: int
    winner_path: str
    loser_path: str
    winner_score: int
    loser_score: int


@dataclass
class EvalRecord(Record):
    """eval/records.jsonl: one evaluation image (held-out prompt x seed x LoRA scale) and its measures."""

    prompt_id: str
    prompt: str
    seed: int
    generator_seed: int
    scale: float
    path: str
    clip_score: float | None = None
    judge_score: int | None = None
    confidence: float | None = None
    detected: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        # Measures not taken (judge and detector off) are left out of the line, not written as null.
        return {k: v for k, v in asdict(self).items() if v is not None or k not in _EVAL_MEASURES}


_EVAL_MEASURES = ("clip_score", "judge_score", "confidence", "detected")


R = TypeVar("R", bound=Record)


def read_records(path: Path, cls: type[R], strict: bool = False) -> list[R]:
    """The intact records of ``path`` as ``cls``; a line that lacks a field of ``cls`` is skipped, warned, or
    with ``strict`` raises RunDirError naming the line (so do damaged lines, see ``read_jsonl``)."""
    out = []
    for i, data in enumerate(read_jsonl(path, strict)):
        try:
            out.append(cls.from_dict(data))
        except (KeyError, TypeError):
            if strict:
                raise RunDirError(
                    f"{path}: record {i + 1} is not a {cls.__name__} ({DAMAGED}); repair or delete that "
                    "line (ccsr run skips it)"
                ) from None
            logger.warning("%s: record %d is not a %s; skipping it", path, i + 1, cls.__name__)
    return out


def append_records(path: Path, records: Iterable[Record]) -> None:
    append_jsonl(path, [r.to_dict() for r in records])


def write_records(path: Path, records: Iterable[Record]) -> None:
    write_jsonl(path, [r.to_dict() for r in records])


def _write_image_folder(final: Path, rows: list[tuple[dict, dict[str, tuple[str, Path]]]]) -> Path:
    """An image folder with ``metadata.jsonl``, built beside ``final`` and renamed into place. Each row is
    (metadata, {column: (file name, source image)}): the column holds the file name (``file_name`` for a single
    image, ``<feature>_file_name`` for several; datasets' imagefolder loads each as an image feature)."""
    import shutil

    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    meta = []
    for row, images in rows:
        for name, src in images.values():
            if Path(name).name != name or name.startswith("."):  # names come from prompt ids: data
                raise RunDirError(f"refusing to write {name!r} into {final}: not a plain file name")
            try:
                os.link(src, tmp / name)
            except OSError:
                shutil.copyfile(src, tmp / name)
        meta.append({column: name for column, (name, _) in images.items()} | row)
    write_jsonl(tmp / "metadata.jsonl", meta)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def write_dataset(run: RunDir, k: int, pairs: Iterable[Pair]) -> Path:
    """Iteration k's training set as an image folder with ``metadata.jsonl`` (the layout of diffusers'
    training scripts and datasets' imagefolder); image names come from prompt ids and candidate indices,
    never prompt text."""
    rows = [
        (
            {"text": p.prompt},
            {"file_name": (f"{p.prompt_id}-{p.index:02d}.png", run.inside(run.root / p.path))},
        )
        for p in pairs
    ]
    return _write_image_folder(run.files(k)["dataset"], rows)


def write_preference_dataset(run: RunDir, k: int, preferences: Iterable[Preference]) -> Path:
    """Iteration k's preference pairs as an image folder with Pick-a-Pic's column names (``caption``,
    ``jpg_0``, ``jpg_1``, ``label_0`` = 1: the first image is preferred), the data diffusers' Diffusion-DPO
    research example trains on; the two images are named by ``jpg_0_file_name`` and ``jpg_1_file_name``
    (datasets' imagefolder loads each as an image column), with both judge scores beside them."""
    rows = []
    for p in preferences:
        stem = f"{p.prompt_id}-{p.winner_index:02d}-vs-{p.loser_index:02d}"
        images = {
            "jpg_0_file_name": (f"{stem}-winner.png", run.inside(run.root / p.winner_path)),
            "jpg_1_file_name": (f"{stem}-loser.png", run.inside(run.root / p.loser_path)),
        }
        meta = {"caption": p.prompt, "label_0": 1, "score_0": p.winner_score, "score_1": p.loser_score}
        rows.append((meta, images))
    return _write_image_folder(run.files(k)["preference_dataset"], rows)
