"""A finished loop run seen through the proof's evaluator, iteration by iteration: the evaluation images the
gate decided on (per LoRA scale), and the selection (are the chosen pairs better than their candidates?).

These views explain a result; none of them is a reported number (``measure_final`` draws those).
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image

from ccsr.records import Candidate, EvalRecord, Pair, PromptRecord, read_records
from ccsr.rundir import RunDir, read_json
from experiments.shapes import evaluator, world

GRADES = ("count", "colour", "background", "exact")


def _grade(path: Path, prompt: str, pixels: bool = False) -> dict:
    """The evaluator's grades of one saved image; with ``pixels``, a 32 px copy for the diversity measure."""
    image = Image.open(path).convert("RGB")
    grade = evaluator.grade_image(prompt, image)
    out = {g: bool(grade[g]) for g in GRADES}
    if pixels:
        out["pixels"] = np.asarray(image.resize((32, 32)), dtype=np.float32) / 255.0
    return out


def _diversity(rows: list[dict]) -> float | None:
    """Mean absolute pixel difference between images of the same prompt (different seeds); 0 = collapse."""
    by_prompt: dict[str, list[np.ndarray]] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_id"], []).append(r["pixels"])
    diffs = [float(np.abs(a - b).mean()) for imgs in by_prompt.values() for a, b in combinations(imgs, 2)]
    return round(float(np.mean(diffs)), 4) if diffs else None


def _summary(rows: list[dict], base: dict[tuple, dict]) -> dict:
    n = len(rows)
    out = {g: round(sum(r[g] for r in rows) / n, 4) for g in GRADES}
    scores = [r["score"] for r in rows if r["score"] is not None]
    out["score"] = round(sum(scores) / len(scores), 3) if scores else None
    out["diversity"] = _diversity(rows)
    out["n"] = n
    diffs = [
        r["score"] - base[(r["prompt_id"], r["seed"])]["score"]
        for r in rows
        if r["score"] is not None and base[(r["prompt_id"], r["seed"])]["score"] is not None
    ]
    out["wins"] = sum(d > 0 for d in diffs)
    out["ties"] = sum(d == 0 for d in diffs)
    out["losses"] = sum(d < 0 for d in diffs)
    return out


def measure_eval(run: RunDir, k: int) -> dict[str, dict]:
    """Iteration k's evaluation images graded, with the run's own judge score, per LoRA scale."""
    records = read_records(run.iteration_dir(k) / "eval" / "records.jsonl", EvalRecord)
    rows = [
        {"prompt_id": r.prompt_id, "seed": r.seed, "scale": float(r.scale), "score": r.judge_score}
        | _grade(run.root / r.path, r.prompt, pixels=True)
        for r in records
    ]
    base = {(r["prompt_id"], r["seed"]): r for r in rows if r["scale"] == 0.0}
    return {
        f"{scale:g}": _summary([r for r in rows if r["scale"] == scale], base)
        for scale in sorted({r["scale"] for r in rows})
    }


def _mean(rows: list[dict], key: str) -> float | None:
    return round(float(np.mean([r[key] for r in rows])), 4) if rows else None


def measure_selection(run: RunDir, k: int) -> dict:
    """Iteration k's chosen pairs against the candidates they were chosen from, and the weak colours apart."""
    files = run.files(k)
    prompts = {p.id: p.prompt for p in read_records(files["prompts"], PromptRecord)}
    cands = [
        {"colour_asked": world.parse_caption(prompts[c.prompt_id]).colour}
        | _grade(run.root / c.path, prompts[c.prompt_id])
        for c in read_records(files["candidates"], Candidate)
    ]
    pairs = [
        {"colour_asked": world.parse_caption(p.prompt).colour} | _grade(run.root / p.path, p.prompt)
        for p in read_records(files["pairs"], Pair)
    ]
    out = {"prompts": len(prompts), "pairs": len(pairs)}
    for g in ("colour", "count", "exact"):
        out[f"candidates_{g}"] = _mean(cands, g)
        out[f"pairs_{g}"] = _mean(pairs, g)
    return out


def measure_run(run_dir: Path) -> dict:
    """Per iteration: the evaluation per scale, the selection, the gate's decision; the final champion."""
    run = RunDir(run_dir)
    state = read_json(run.champion_path)
    if state is None:
        raise RuntimeError(f"{run.champion_path}: missing or damaged; the run's gate never ran")
    gate = {h["iteration"]: h for h in state["history"]}
    iterations = {
        k: {"gate": gate.get(k), "scales": measure_eval(run, k), "selection": measure_selection(run, k)}
        for k in run.iterations()
    }
    return {"iterations": iterations, "champion": state["champion"]}
