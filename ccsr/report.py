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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from ccsr.plots import as_number, plot_across_iterations, plot_eval_by_scale
from ccsr.records import Candidate, Detection, EvalRecord, Judgment, Pair, PromptRecord, read_records
from ccsr.rundir import STAGES, RunDir, RunDirError, atomic_write_text, read_json

if TYPE_CHECKING:
    from ccsr.config import Config

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
class CandidateView:
    index: int
    seed: int
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
    candidates: list[CandidateView]
    pair: Pair | None
    detected: bool  # the detector looked at this prompt's best images


@dataclass
class EvalSample:
    prompt_id: str
    prompt: str
    seed: int
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
        return sum(as_number(info.get("seconds")) or 0.0 for info in self.stage_info.values())


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 2) -> str:
    """Numbers for humans; anything missing (None, NaN, not a number) is '-'."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    number = as_number(value)
    if number is None:
        return "-" if value is None or isinstance(value, (float, int)) else str(value)
    return f"{number:.{digits}f}"


def fmt_seconds(value: Any) -> str:
    seconds = as_number(value)
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _scale_order(scale: Any) -> float:
    """Sort key of a LoRA scale (eval.json's keys are strings); anything unreadable goes last."""
    number = as_number(scale)
    return math.inf if number is None else number


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


def _load_questions(questions_file: str) -> list[tuple[str, str]]:
    """(id, text) of the run's question set; empty (ids Q1.. without text) if the file can't be read any more."""
    from ccsr.questions import load_question_set

    try:
        qs = load_question_set(questions_file)
    except Exception:  # the report must render even if the question file moved or changed format
        logger.warning("report: question texts unavailable; showing ids only", exc_info=True)
        return []
    return [(q.id, q.text) for q in qs.questions]


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


# ---------------------------------------------------------------------------------------------------------------
# Collecting one iteration
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class IterationRecords:
    """One iteration's committed records, keyed the way the page looks them up."""

    prompts: list[PromptRecord]
    candidates: dict[str, list[Candidate]]  # by prompt id, in index order
    judgments: dict[tuple[str, int], Judgment]  # by (prompt id, index)
    detections: dict[tuple[str, int], Detection]
    pairs: dict[str, Pair]  # by prompt id

    @classmethod
    def read(cls, run: RunDir, k: int) -> IterationRecords:
        files = run.files(k)
        candidates: dict[str, list[Candidate]] = {}
        for c in sorted(read_records(files["candidates"], Candidate), key=lambda c: c.index):
            candidates.setdefault(c.prompt_id, []).append(c)
        return cls(
            prompts=read_records(files["prompts"], PromptRecord),
            candidates=candidates,
            judgments={(j.prompt_id, j.index): j for j in read_records(files["judgments"], Judgment)},
            detections={(d.prompt_id, d.index): d for d in read_records(files["detections"], Detection)},
            pairs={p.prompt_id: p for p in read_records(files["pairs"], Pair)},
        )


def _answers(judgment: Judgment | None, questions: list[tuple[str, str]], class_name: str) -> list[Answer]:
    if judgment is None:
        return []
    p_yes = judgment.p_yes or []
    answers = []
    for i, answer in enumerate(judgment.answers):
        qid, text = questions[i] if i < len(questions) else (f"Q{i + 1}", "")
        answers.append(
            Answer(
                qid=qid,
                text=_question_text(text, class_name),
                answer=str(answer),
                p_yes=as_number(p_yes[i]) if i < len(p_yes) else None,
            )
        )
    return answers


def _prompt_view(
    prompt: PromptRecord,
    records: IterationRecords,
    questions: list[tuple[str, str]],
    class_name: str,
    link: ImageLinker,
) -> PromptView:
    pair = records.pairs.get(prompt.id)
    candidates = []
    for c in records.candidates.get(prompt.id, []):
        judgment = records.judgments.get((prompt.id, c.index))
        detection = records.detections.get((prompt.id, c.index))
        candidates.append(
            CandidateView(
                index=c.index,
                seed=c.seed,
                src=link(c.path),
                path=c.path,
                score=judgment.score if judgment else None,
                confidence=detection.confidence if detection else None,
                selected=pair is not None and pair.index == c.index,
                answers=_answers(judgment, questions, class_name),
            )
        )
    return PromptView(
        id=prompt.id,
        text=prompt.prompt,
        candidates=candidates,
        pair=pair,
        detected=any(pid == prompt.id for pid, _ in records.detections),
    )


def _eval_rows(eval_obj: dict) -> list[dict]:
    """eval.json's ``by_scale`` rows in scale order, the chosen ``best_scale`` marked."""
    by_scale = eval_obj.get("by_scale") or {}
    best = as_number(eval_obj.get("best_scale"))
    rows = []
    for key in sorted(by_scale, key=_scale_order):
        scale = as_number(key)
        is_best = best is not None and scale is not None and math.isclose(scale, best)
        rows.append({"scale": key, "best": is_best, **by_scale[key]})
    return rows


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
        if any(row.get(key) is not None for row in by_scale.values()):
            columns.append((key, label))
    return columns


def _eval_samples(run: RunDir, k: int, link: ImageLinker) -> list[EvalSample]:
    """The first seed of the first few validation prompts, at every scale."""
    samples: dict[tuple[str, int], EvalSample] = {}
    shown: set[str] = set()
    for r in read_records(run.iteration_dir(k) / "eval" / "records.jsonl", EvalRecord):
        key = (r.prompt_id, r.seed)
        if key not in samples:
            if r.prompt_id in shown or len(shown) >= EVAL_SAMPLE_PROMPTS:
                continue
            shown.add(r.prompt_id)
            samples[key] = EvalSample(r.prompt_id, r.prompt, r.seed, [])
        samples[key].cells.append(
            {
                "scale": r.scale,
                "src": link(r.path),
                "clip_score": r.clip_score,
                "judge_score": r.judge_score,
                "detected": r.detected,
            }
        )
    for sample in samples.values():
        sample.cells.sort(key=lambda c: c["scale"])
    return list(samples.values())


def _iteration(
    run: RunDir,
    k: int,
    class_name: str,
    questions: list[tuple[str, str]],
    link: ImageLinker,
    champion_history: list[dict],
) -> IterationView:
    done = run.stages_done(k)
    records = IterationRecords.read(run, k)
    prompt_stage = done.get("prompts", {})
    dropped = prompt_stage.get("dropped") or {}
    eval_obj = read_json(run.eval_path(k))
    return IterationView(
        index=k,
        complete=all(s in done for s in STAGES),
        stages_done=[s for s in STAGES if s in done],
        stage_in_progress=next((s for s in STAGES if s not in done), None),
        stage_info={s: done[s] for s in STAGES if s in done},
        prompts=[_prompt_view(p, records, questions, class_name, link) for p in records.prompts],
        dropped=dropped if isinstance(dropped, dict) else {"total": dropped},
        attempts=prompt_stage.get("attempts"),
        diversity=_diversity_text(prompt_stage.get("diversity")),
        n_candidates=sum(len(v) for v in records.candidates.values()),
        n_judged=len(records.judgments),
        n_pairs=len(records.pairs),
        lora=run.lora_dir(k).relative_to(run.root).as_posix() if run.lora_file(k).is_file() else None,
        eval=eval_obj,
        eval_rows=_eval_rows(eval_obj) if eval_obj else [],
        eval_columns=_eval_columns(eval_obj.get("by_scale") or {}) if eval_obj else [],
        eval_plot=None,
        eval_samples=_eval_samples(run, k, link) if eval_obj else [],
        champion_entries=[h for h in champion_history if h.get("iteration") == k],
    )


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


def _open_run(run_dir: str | Path) -> tuple[RunDir, Config]:
    """The run directory and its config; RunDirError when it is not a run dir, ConfigError when the config
    does not load (both are one line through the CLI)."""
    from ccsr.config_files import load_config

    run = RunDir(run_dir)
    if not run.root.is_dir():
        raise RunDirError(
            f"{run.root} does not exist; pass the run directory of a ccsr run (e.g. runs/giraffe)"
        )
    if not run.config_path.is_file():
        raise RunDirError(f"{run.root} is not a ccsr run directory (no config.yaml); pass e.g. runs/giraffe")
    return run, load_config(run.config_path)


def _draw_plots(run: RunDir, iterations: list[IterationView], class_name: str) -> str | None:
    """One plot per evaluated iteration (set as its ``eval_plot``) and, with two or more, one across them;
    returns the across-iterations plot's relative URL."""
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
    if len(evals) < 2:  # with a single evaluated iteration the per-iteration plot already says it all
        return None
    plot_across_iterations(evals, assets / "across-iterations.png", title=f"{class_name}: across iterations")
    return f"{ASSETS_DIR}/across-iterations.png"


def _best(iterations: list[IterationView]) -> dict | None:
    """The evaluated iteration with the highest win-rate (the first of equals)."""
    best = None
    for it in iterations:
        wr = as_number((it.eval or {}).get("win_rate"))
        if wr is not None and (best is None or wr > best["win_rate"]):
            best = {
                "win_rate": wr,
                "iteration": it.index,
                "scale": it.eval.get("best_scale"),
                "eval": it.eval,
            }
    return best


def _stage_totals(iterations: list[IterationView]) -> dict[str, float | None]:
    """Seconds per stage over all iterations; None for a stage that never ran."""
    totals: dict[str, float | None] = {}
    for s in STAGES:
        seconds = [as_number(it.stage_info[s].get("seconds")) for it in iterations if s in it.stage_info]
        totals[s] = sum(x for x in seconds if x is not None) if seconds else None
    return totals


def _render(
    run: RunDir,
    cfg: Config,
    iterations: list[IterationView],
    champion: dict | None,
    link: ImageLinker,
    across_plot: str | None,
) -> str:
    stage_totals = _stage_totals(iterations)
    in_progress = next((it for it in iterations if not it.complete), None)
    return (
        _environment()
        .get_template("report.html.j2")
        .render(
            class_name=cfg.class_name or "",
            run_dir=run.root.name,
            base_model=cfg.generator.model,
            detector_threshold=cfg.filter.detection_threshold,
            iterations=iterations,
            iterations_completed=sum(it.complete for it in iterations),
            iterations_target=cfg.iterations,
            stage_in_progress=(
                f"iteration {in_progress.index}: {in_progress.stage_in_progress}" if in_progress else None
            ),
            n_prompts=sum(len(it.prompts) for it in iterations),
            n_pairs=sum(it.n_pairs for it in iterations),
            n_validation=len(read_records(run.validation_path, PromptRecord)),
            best=_best(iterations),
            stages=STAGES,
            stage_totals=stage_totals,
            total_seconds=sum(x for x in stage_totals.values() if x is not None),
            champion=champion.get("champion") if champion else None,
            champion_history=champion.get("history", []) if champion else [],
            has_champion_file=champion is not None,
            across_plot=across_plot,
            generated_at=time.strftime("%Y-%m-%d %H:%M:%S"),
            images={"embedded": link.embedded, "linked": link.linked, "missing": link.missing},
        )
    )


def write_report(
    run_dir: str | Path,
    embed_max_bytes: int = EMBED_MAX_BYTES,
    embed_budget_bytes: int = EMBED_BUDGET_BYTES,
) -> Path:
    """Write ``run_dir/report.html`` (atomically) and its plots under ``run_dir/report/``; return the HTML path.

    Raises ``RunDirError`` when ``run_dir`` is not a ccsr run directory or cannot be written, ``ConfigError``
    when its config.yaml does not load.
    """
    run, cfg = _open_run(run_dir)
    class_name = cfg.class_name or ""
    link = ImageLinker(run.root, embed_max_bytes, embed_budget_bytes)
    questions = _load_questions(cfg.judge.questions)
    champion = read_json(run.champion_path)  # None: no champion.json yet (the page then shows no champion)
    history = champion.get("history", []) if champion else []
    iterations = [_iteration(run, k, class_name, questions, link, history) for k in run.iterations()]
    out = run.root / REPORT_NAME
    try:
        across_plot = _draw_plots(run, iterations, class_name)
        atomic_write_text(out, _render(run, cfg, iterations, champion, link, across_plot))
    except PermissionError as exc:
        raise RunDirError(f"cannot write in {run.root} ({exc.strerror}); check its permissions") from None
    logger.info(
        "report: %s (%d images embedded, %d linked, %d missing)",
        out,
        link.embedded,
        link.linked,
        link.missing,
    )
    return out
