"""``ccsr report RUN_DIR``: one self-contained static HTML page about a run, written to ``RUN_DIR/report.html``.

The page opens from disk with no network: candidate images are referenced by paths relative to the report (the
report sits at the run root, so they stay inside the run directory), small ones are embedded as data URIs, plots
are PNGs under ``RUN_DIR/report/``, CSS is inline and there is no JavaScript. Every piece of text comes from
records, some of it written by an LLM, so the template is rendered with autoescaping on.

The report only reads the run directory: it never loads a model (not even to resolve an embedded model name) and
works on a run that is still in progress, showing what has been committed so far.
"""

from __future__ import annotations

import base64
import logging
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

from ccsr.rundir import STAGES, RunDir, RunDirError, atomic_write_text, read_json, read_jsonl

logger = logging.getLogger(__name__)

REPORT_NAME = "report.html"
ASSETS_DIR = "report"
# Thumbnails up to this size are embedded (the tiny models' 64 px PNGs), so a small report survives being
# copied on its own; bigger images (512 px, ~400 KB each) stay files referenced by relative path.
EMBED_MAX_BYTES = 12 * 1024
EMBED_BUDGET_BYTES = 4 * 1024 * 1024
# Evaluation samples shown per iteration: the first validation prompts, first seed, every scale.
EVAL_SAMPLE_PROMPTS = 4
_PLACEHOLDER_RE = re.compile(r"\{(class_name|prompt)\}")


# ---------------------------------------------------------------------------------------------------------------
# What the template sees
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Answer:
    qid: str
    text: str
    answer: str
    p_yes: float | None


@dataclass
class Candidate:
    index: int
    seed: int | None
    src: str | None  # relative URL or data URI; None when the file is missing or outside the run dir
    path: str
    score: int | None
    confidence: float | None
    selected: bool
    answers: list[Answer]


@dataclass
class PromptView:
    id: str
    text: str
    candidates: list[Candidate]
    pair: dict | None
    detected: bool  # the detector looked at this prompt's best images


@dataclass
class EvalSample:
    prompt_id: str
    prompt: str
    seed: Any
    cells: list[dict]  # {scale, src, clip_score, judge_score, detected}


@dataclass
class IterationView:
    index: int
    complete: bool
    stages_done: list[str]
    stage_in_progress: str | None
    stage_info: dict[str, dict]
    prompts: list[PromptView]
    dropped: dict[str, Any]
    attempts: Any
    diversity: str | None
    n_candidates: int
    n_judged: int
    n_pairs: int
    lora: str | None
    eval: dict | None
    eval_rows: list[dict]
    eval_columns: list[tuple[str, str]]
    eval_plot: str | None
    eval_samples: list[EvalSample]
    champion_entries: list[dict] = field(default_factory=list)

    @property
    def total_seconds(self) -> float:
        return sum(_number(info.get("seconds")) or 0.0 for info in self.stage_info.values())


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def fmt(value: Any, digits: int = 2) -> str:
    """Numbers for humans; anything missing (None, NaN, not a number) is '-'."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    number = _number(value)
    if number is None:
        return "-" if value is None or isinstance(value, (float, int)) else str(value)
    return f"{number:.{digits}f}"


def fmt_seconds(value: Any) -> str:
    seconds = _number(value)
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


class ImageLinker:
    """Turns a record's image path into an ``<img src>``: a data URI when small, else a path relative to the
    report. A path that leaves the run directory (records are data, not trusted) or a missing file gives None."""

    def __init__(self, root: Path, embed_max_bytes: int, embed_budget_bytes: int):
        self.root = root.resolve()
        self.embed_max_bytes = embed_max_bytes
        self.budget = embed_budget_bytes
        self.embedded = 0
        self.linked = 0
        self.missing = 0

    def __call__(self, rel_path: str | None) -> str | None:
        if not rel_path:
            return None
        try:
            path = (self.root / rel_path).resolve()
        except (OSError, RuntimeError):
            self.missing += 1
            return None
        if not path.is_relative_to(self.root):
            logger.warning("report: ignoring image outside the run directory: %s", rel_path)
            self.missing += 1
            return None
        if not path.is_file():
            self.missing += 1
            return None
        size = path.stat().st_size
        if size <= self.embed_max_bytes and size <= self.budget and path.suffix.lower() == ".png":
            self.budget -= size
            self.embedded += 1
            return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
        self.linked += 1
        return quote(path.relative_to(self.root).as_posix())


def _load_questions(cfg: dict) -> list[tuple[str, str]]:
    """(id, text) of the run's question set; ids Q1.. without text if the file can't be read any more."""
    try:
        from ccsr.config import resolve_data_path
        from ccsr.questions import QuestionSet

        name = (cfg.get("judge") or {}).get("questions") or "prompts/questions.yaml"
        qs = QuestionSet.load(resolve_data_path(name))
        return [(q.id, q.text) for q in qs.questions]
    except Exception as exc:  # the report must render even if the question file moved or changed format
        logger.warning("report: question texts unavailable (%s); showing ids only", exc)
        return []


def _question_text(text: str, class_name: str) -> str:
    # The class is substituted as the judge saw it; the T2I prompt (shown above each grid) is left as a marker
    # so that a 100-prompt iteration does not repeat every prompt 20 times per image.
    values = {"class_name": class_name, "prompt": "[prompt]"}
    return _PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], text)


def _diversity_text(value: Any) -> str | None:
    """``{"mean_pairwise_similarity": 0.12, "distinct_bigrams": 0.9}`` -> "mean pairwise similarity 0.12, ..."."""
    if value is None:
        return None
    if isinstance(value, dict):
        return ", ".join(f"{str(k).replace('_', ' ')} {fmt(v)}" for k, v in value.items())
    return fmt(value)


def _group(records: list[dict], key: str = "prompt_id") -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in records:
        out.setdefault(str(r.get(key)), []).append(r)
    return out


def _eval_columns(by_scale: dict) -> list[tuple[str, str]]:
    columns = [
        ("clip_score", "CLIP score"),
        ("wins", "wins"),
        ("ties", "ties"),
        ("losses", "losses"),
        ("win_rate", "win-rate"),
        ("win_tie_rate", "wins+ties rate"),
    ]
    for key, label in (("judge_score", "judge score"), ("detection_rate", "detection rate")):
        if any(isinstance(r, dict) and r.get(key) is not None for r in by_scale.values()):
            columns.append((key, label))
    return columns


# ---------------------------------------------------------------------------------------------------------------
# Collecting one iteration
# ---------------------------------------------------------------------------------------------------------------


def _iteration(
    run: RunDir,
    k: int,
    class_name: str,
    questions: list[tuple[str, str]],
    link: ImageLinker,
    validation: dict[str, str],
    champion_history: list[dict],
) -> IterationView:
    files = run.files(k)
    done = run.stages_done(k)
    prompts = read_jsonl(files["prompts"])
    candidates = _group(read_jsonl(files["candidates"]))
    judgments = {(str(r.get("prompt_id")), r.get("index")): r for r in read_jsonl(files["judgments"])}
    detections = {(str(r.get("prompt_id")), r.get("index")): r for r in read_jsonl(files["detections"])}
    detected_prompts = {pid for pid, _ in detections}
    pairs_list = read_jsonl(files["pairs"])
    pairs = {str(p.get("prompt_id")): p for p in pairs_list}

    views = []
    for p in prompts:
        pid = str(p.get("id"))
        pair = pairs.get(pid)
        cands = []
        for c in sorted(candidates.get(pid, []), key=lambda c: c.get("index", 0)):
            idx = c.get("index")
            judged = judgments.get((pid, idx)) or {}
            answers_raw = judged.get("answers") or []
            p_yes = judged.get("p_yes") or []
            answers = []
            for i, answer in enumerate(answers_raw):
                qid, text = questions[i] if i < len(questions) else (f"Q{i + 1}", "")
                answers.append(
                    Answer(
                        qid=qid,
                        text=_question_text(text, class_name),
                        answer=str(answer),
                        p_yes=_number(p_yes[i]) if i < len(p_yes) else None,
                    )
                )
            det = detections.get((pid, idx))
            cands.append(
                Candidate(
                    index=idx,
                    seed=c.get("seed"),
                    src=link(c.get("path")),
                    path=str(c.get("path")),
                    score=judged.get("score"),
                    confidence=_number(det.get("confidence")) if det else None,
                    selected=pair is not None and pair.get("index") == idx,
                    answers=answers,
                )
            )
        views.append(
            PromptView(
                id=pid,
                text=str(p.get("prompt", "")),
                candidates=cands,
                pair=pair,
                detected=pid in detected_prompts,
            )
        )

    prompt_stage = done.get("prompts") if isinstance(done.get("prompts"), dict) else {}
    dropped = prompt_stage.get("dropped") or {}
    if not isinstance(dropped, dict):
        dropped = {"total": dropped}
    eval_obj = read_json(run.eval_path(k))
    by_scale = (eval_obj or {}).get("by_scale") or {}
    best = _number((eval_obj or {}).get("best_scale"))
    eval_rows = []
    for key in sorted(by_scale, key=lambda s: _number(s) if _number(s) is not None else math.inf):
        row = by_scale[key] if isinstance(by_scale[key], dict) else {}
        scale = _number(key)
        eval_rows.append(
            {
                "scale": key,
                "best": best is not None and scale is not None and math.isclose(scale, best),
                **row,
            }
        )
    lora = run.lora_dir(k)
    return IterationView(
        index=k,
        complete=all(s in done for s in STAGES),
        stages_done=[s for s in STAGES if s in done],
        stage_in_progress=next((s for s in STAGES if s not in done), None),
        stage_info={s: done[s] for s in STAGES if s in done and isinstance(done[s], dict)},
        prompts=views,
        dropped=dropped,
        attempts=prompt_stage.get("attempts"),
        diversity=_diversity_text(prompt_stage.get("diversity")),
        n_candidates=sum(len(v) for v in candidates.values()),
        n_judged=len(judgments),
        n_pairs=len(pairs_list),
        lora=(
            lora.relative_to(run.root).as_posix()
            if (lora / "pytorch_lora_weights.safetensors").is_file()
            else None
        ),
        eval=eval_obj,
        eval_rows=eval_rows,
        eval_columns=_eval_columns(by_scale),
        eval_plot=None,
        eval_samples=_eval_samples(run, k, validation, link) if eval_obj else [],
        champion_entries=[h for h in champion_history if h.get("iteration") == k],
    )


def _eval_samples(run: RunDir, k: int, validation: dict[str, str], link: ImageLinker) -> list[EvalSample]:
    records = read_jsonl(run.iteration_dir(k) / "eval" / "records.jsonl")
    samples: dict[tuple[str, Any], EvalSample] = {}
    for r in records:
        pid = str(r.get("prompt_id"))
        key = (pid, r.get("seed"))
        if key not in samples:
            if len({p for p, _ in samples}) >= EVAL_SAMPLE_PROMPTS or any(p == pid for p, _ in samples):
                continue  # first seed of the first few validation prompts only
            samples[key] = EvalSample(pid, validation.get(pid, ""), r.get("seed"), [])
        samples[key].cells.append(
            {
                "scale": r.get("scale"),
                "src": link(r.get("path")),
                "clip_score": r.get("clip_score"),
                "judge_score": r.get("judge_score"),
                "detected": r.get("detected"),
            }
        )
    for sample in samples.values():
        sample.cells.sort(key=lambda c: _number(c["scale"]) if _number(c["scale"]) is not None else math.inf)
    return list(samples.values())


# ---------------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------------


def _environment():
    from jinja2 import Environment, PackageLoader, StrictUndefined

    env = Environment(
        loader=PackageLoader("ccsr", "templates"),
        autoescape=True,  # prompts are written by an LLM: never trust them as markup
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["fmt"] = fmt
    env.filters["seconds"] = fmt_seconds
    return env


def write_report(
    run_dir: str | Path,
    embed_max_bytes: int = EMBED_MAX_BYTES,
    embed_budget_bytes: int = EMBED_BUDGET_BYTES,
) -> Path:
    """Write ``run_dir/report.html`` (atomically) and its plots under ``run_dir/report/``; return the HTML path.

    Raises ``RunDirError`` when ``run_dir`` is not a ccsr run directory.
    """
    from ccsr.plots import plot_across_iterations, plot_eval_by_scale

    run = RunDir(run_dir)
    if not run.root.is_dir():
        raise RunDirError(
            f"{run.root} does not exist; pass the run directory of a ccsr run (e.g. runs/giraffe)"
        )
    if not run.config_path.is_file():
        raise RunDirError(f"{run.root} is not a ccsr run directory (no config.yaml); pass e.g. runs/giraffe")
    try:
        cfg = yaml.safe_load(run.config_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        raise RunDirError(
            f"{run.config_path} is not valid YAML; restore it from the run's first start"
        ) from None
    if not isinstance(cfg, dict):
        raise RunDirError(f"{run.config_path} is not a config mapping; restore it from the run's first start")

    class_name = str(cfg.get("class_name") or "")
    questions = _load_questions(cfg)
    link = ImageLinker(run.root, embed_max_bytes, embed_budget_bytes)
    validation = {str(v.get("id")): str(v.get("prompt", "")) for v in read_jsonl(run.validation_path)}
    champion = read_json(run.root / "champion.json")
    champion = champion if isinstance(champion, dict) else None
    history = [h for h in (champion or {}).get("history") or [] if isinstance(h, dict)]

    iterations = [
        _iteration(run, k, class_name, questions, link, validation, history) for k in run.iterations()
    ]

    assets = run.root / ASSETS_DIR
    evals = []
    for it in iterations:
        if it.eval and it.eval.get("by_scale"):
            name = f"eval-iter-{it.index:03d}.png"
            plot_eval_by_scale(
                it.eval, assets / name, title=f"iteration {it.index}: evaluation by LoRA scale"
            )
            it.eval_plot = f"{ASSETS_DIR}/{name}"
            evals.append((it.index, it.eval))
    across_plot = None
    if len(evals) >= 2:  # with a single evaluated iteration the per-iteration plot already says it all
        plot_across_iterations(
            evals, assets / "across-iterations.png", title=f"{class_name}: across iterations"
        )
        across_plot = f"{ASSETS_DIR}/across-iterations.png"

    best = None
    for it in iterations:
        wr = _number((it.eval or {}).get("win_rate"))
        if wr is not None and (best is None or wr > best["win_rate"]):
            best = {
                "win_rate": wr,
                "iteration": it.index,
                "scale": it.eval.get("best_scale"),
                "eval": it.eval,
            }
    stage_totals: dict[str, float | None] = {}
    for s in STAGES:
        seconds = [_number(it.stage_info[s].get("seconds")) for it in iterations if s in it.stage_info]
        stage_totals[s] = sum(x for x in seconds if x is not None) if seconds else None  # None: never ran
    stage_in_progress = next(
        (f"iteration {it.index}: {it.stage_in_progress}" for it in iterations if not it.complete), None
    )
    target = cfg.get("iterations")
    context = {
        "class_name": class_name,
        "run_dir": run.root.name,
        "base_model": (cfg.get("generator") or {}).get("model"),
        "detector_threshold": (cfg.get("detector") or {}).get("threshold"),
        "iterations": iterations,
        "iterations_completed": sum(it.complete for it in iterations),
        "iterations_target": target,
        "stage_in_progress": stage_in_progress,
        "n_prompts": sum(len(it.prompts) for it in iterations),
        "n_pairs": sum(it.n_pairs for it in iterations),
        "n_validation": len(validation),
        "best": best,
        "stages": STAGES,
        "stage_totals": stage_totals,
        "total_seconds": sum(x for x in stage_totals.values() if x is not None),
        "champion": (champion or {}).get("champion") if champion else None,
        "champion_history": history,
        "has_champion_file": champion is not None,
        "across_plot": across_plot,
        "generated_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "images": {"embedded": link.embedded, "linked": link.linked, "missing": link.missing},
    }
    html = _environment().get_template("report.html.j2").render(**context)
    out = run.root / REPORT_NAME
    atomic_write_text(out, html)
    logger.info(
        "report: %s (%d images embedded, %d linked, %d missing)",
        out,
        link.embedded,
        link.linked,
        link.missing,
    )
    return out


def main_report(run_dir: str) -> int:
    """``ccsr report RUN_DIR``: write the report, print its path; one line on stderr and exit 2 on bad input."""
    try:
        out = write_report(Path(run_dir))
    except (RunDirError, FileNotFoundError, NotADirectoryError) as exc:
        print(f"ccsr report: {exc}", file=sys.stderr)
        return 2
    except PermissionError as exc:
        print(
            f"ccsr report: cannot write in {run_dir} ({exc.strerror}); check its permissions", file=sys.stderr
        )
        return 2
    print(out)
    return 0
