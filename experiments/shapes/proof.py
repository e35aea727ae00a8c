"""``make proof``: does the CCSR loop improve a text-to-image model? Measured on the shapes world.

Runs the loop of ``configs/shapes.yaml`` for a few iterations from the shapes base model, plus three ablations
(without the judge, without the detector filter, without the gate), then measures every evaluation image the
loop saved against the world's ground truth: is the count right, the colour, the background, all of them; the
eq. (1) score of the measuring judge; win/tie/loss against the base per (prompt, seed) as the paper defines it
(section 4, a tie when the scores are equal); and image diversity, to catch collapse. Writes the tables and a
plot to ``docs/proof.md`` and to the work folder.

    python -m experiments.shapes.proof            # resumes runs in runs/proof, reuses the cached base model
    python -m experiments.shapes.proof --fresh    # from scratch: base model, loop, ablations
    python -m experiments.shapes.proof --quick --base-model DIR --work-dir DIR --out DIR/proof.md  # smoke run

The base model is ``base_model.cached_base_model()``'s folder (trained there the first time; with ``--fresh``
in the work folder) unless ``--base-model`` names one; every run gets it as ``generator.model``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np

from ccsr.config import REPO_ROOT, load_config, resolve_data_path
from ccsr.rundir import Candidate, EvalRecord, Pair, PromptRecord, RunDir, read_json, read_records
from experiments.shapes import world
from experiments.shapes.base_model import cached_base_model

logger = logging.getLogger(__name__)

CONFIG = REPO_ROOT / "configs" / "shapes.yaml"
# name -> (what it tests, overrides). "ccsr" is the full loop; each ablation removes one part.
VARIANTS = {
    "ccsr": ("the full loop: judge, detector filter, gate", []),
    "no-judge": (
        "judge answers at random: the best-scored of the ten is a random pick",
        ["judge.backend=experiments.shapes.backends:RandomJudge"],
    ),
    "no-detector": ("detector threshold 0: no image is filtered out", ["detector.threshold=0"]),
    "no-gate": ("every LoRA is accepted, better or not", ["gate.enabled=false"]),
    # Not an ablation: the loop with a stricter selection than the paper's (judge.min_score).
    "strict": (
        "a prompt yields a pair only if its best image scores the maximum, 10",
        ["judge.min_score=10"],
    ),
}
QUICK = [
    "prompter.n_prompts=3",
    "prompter.n_validation=2",
    "generator.num_candidates=4",
    "generator.steps=4",
    "trainer.epochs=2",
    "trainer.batch_size=2",
    "evaluator.seeds=[0]",
    "evaluator.scales=[0.0, 1.0]",
]


@dataclass
class Settings:
    class_name: str = "circle"
    iterations: int = 3
    work_dir: Path = REPO_ROOT / "runs" / "proof"
    out: Path = REPO_ROOT / "docs" / "proof.md"
    config: Path = CONFIG
    base_model: str | None = None  # a folder; default: base_model.cached_base_model() (trained once, cached)
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    overrides: list[str] = field(default_factory=list)
    fresh: bool = False
    jobs: int = 1  # variants run side by side in this many processes
    threads: int = 1  # torch CPU threads per process


# --------------------------------------------------------------------------------------------------------------
# running


def _model_cache(s: Settings) -> Path | None:
    # --fresh builds the base model in the work folder, so "from scratch" really retrains it.
    return s.work_dir / "models" if s.fresh else None


def run_variant(s: Settings, name: str) -> tuple[Path, float]:
    from ccsr.cli import main as ccsr_main

    run_dir = s.work_dir / name
    overrides = list(s.overrides) + VARIANTS[name][1]
    overrides.append(f"prompter.validation_file={s.work_dir / f'validation-{s.class_name}.txt'}")
    overrides.append(f"generator.model={s.base_model}")
    cache = _model_cache(s)
    if cache is not None:
        overrides.append(f"model_cache={cache}")
    argv = ["run", "--config", str(s.config), "--class", s.class_name, "--run-dir", str(run_dir)]
    argv += ["--iterations", str(s.iterations)]
    for o in overrides:
        argv += ["--set", o]
    logger.info("variant %s: ccsr %s", name, " ".join(argv))
    start = time.perf_counter()
    code = ccsr_main(argv)
    if code != 0:
        raise RuntimeError(f"variant {name}: ccsr run exited with {code} (see {run_dir}/log.txt)")
    return run_dir, time.perf_counter() - start


def _init_worker(threads: int) -> None:
    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(threads)


def build_base(s: Settings) -> tuple[Path, float]:
    """The base model's folder, trained first if it is not cached yet; returns it and the seconds spent."""
    if s.base_model:
        return Path(s.base_model), 0.0
    start = time.perf_counter()
    path = cached_base_model(_model_cache(s))
    return path, time.perf_counter() - start


# --------------------------------------------------------------------------------------------------------------
# measuring


class Scorer:
    """Ground-truth accuracy and the measuring judge's eq. (1) score of one image, whatever the run's judge."""

    def __init__(self, s: Settings):
        from ccsr.questions import QuestionSet
        from experiments.shapes.backends import MeasuringJudge

        cfg = load_config(s.config, class_name=s.class_name)
        self.judge = MeasuringJudge(cfg)
        self.questions = QuestionSet.load(resolve_data_path(cfg.judge.questions))
        self.class_name = s.class_name

    def __call__(self, path: Path, prompt: str) -> dict:
        from PIL import Image

        image = Image.open(path).convert("RGB")
        spec = world.parse_caption(prompt)
        if spec is None:
            raise ValueError(f"{path}: prompt {prompt!r} is not a caption of the shapes grammar")
        acc = world.accuracy(spec, world.measure(image))
        answer = self.judge.answer([image], [self.questions.render(self.class_name, prompt)])[0]
        return {
            "count": acc.count,
            "colour": acc.colour,
            "background": acc.background,
            "exact": acc.exact,
            "score": self.questions.score(answer.answers),
            "pixels": np.asarray(image.resize((32, 32)), dtype=np.float32) / 255.0,
        }


def _diversity(rows: list[dict]) -> float:
    """Mean absolute pixel difference between images of the same prompt (different seeds); 0 = collapse."""
    by_prompt: dict[str, list[np.ndarray]] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_id"], []).append(r["pixels"])
    diffs = [float(np.abs(a - b).mean()) for imgs in by_prompt.values() for a, b in combinations(imgs, 2)]
    return round(float(np.mean(diffs)), 4) if diffs else float("nan")


def _bootstrap_ci(diffs: list[float], seed: int = 0, draws: int = 2000) -> tuple[float, float]:
    """95% bootstrap interval of a mean of paired differences (resampling (prompt, seed) pairs)."""
    values = np.asarray(diffs, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (draws, len(values)))].mean(1)
    return round(float(np.percentile(means, 2.5)), 4), round(float(np.percentile(means, 97.5)), 4)


def _summary(rows: list[dict], base: dict[tuple, dict] | None) -> dict:
    n = len(rows)
    out = {k: round(sum(r[k] for r in rows) / n, 4) for k in ("count", "colour", "background", "exact")}
    out["score"] = round(sum(r["score"] for r in rows) / n, 3)
    out["diversity"] = _diversity(rows)
    out["count_by_n"] = _count_by_n(rows)
    out["n"] = n
    if base is not None:
        pairs = [(r, base[(r["prompt_id"], r["seed"])]) for r in rows]
        diffs = [r["score"] - b["score"] for r, b in pairs]
        out["wins"] = sum(d > 0 for d in diffs)
        out["ties"] = sum(d == 0 for d in diffs)  # integer scores: paper's |diff| < 0.01 is equality
        out["losses"] = sum(d < 0 for d in diffs)
        out["win_rate"] = round(out["wins"] / n, 4)
        for k in ("count", "exact", "score"):
            out[f"{k}_delta_ci"] = _bootstrap_ci([float(r[k]) - float(b[k]) for r, b in pairs])
    return out


def _count_by_n(rows: list[dict]) -> dict[int, float | None]:
    """Share of rows whose measured count is right, per requested count (rows carry their prompt)."""
    out: dict[int, float | None] = {}
    for n in world.COUNTS:
        hits = [r["count"] for r in rows if world.parse_caption(r["prompt"]).count == n]
        out[n] = round(float(np.mean(hits)), 4) if hits else None
    return out


def _mean(rows: list[dict], key: str) -> float | None:
    return round(float(np.mean([r[key] for r in rows])), 4) if rows else None


def measure_eval(run: RunDir, k: int, scorer: Scorer) -> dict[str, dict]:
    """Iteration k's evaluation images measured, summarised per LoRA scale against the base (scale 0)."""
    records = read_records(run.iteration_dir(k) / "eval" / "records.jsonl", EvalRecord)
    rows = [
        {"prompt_id": r.prompt_id, "prompt": r.prompt, "seed": r.seed, "scale": float(r.scale)}
        | scorer(run.root / r.path, r.prompt)
        for r in records
    ]
    base = {(r["prompt_id"], r["seed"]): r for r in rows if r["scale"] == 0.0}
    return {
        f"{scale:g}": _summary([r for r in rows if r["scale"] == scale], base)
        for scale in sorted({r["scale"] for r in rows})
    }


def measure_selection(run: RunDir, k: int, scorer: Scorer) -> dict:
    """Are iteration k's chosen pairs better than the candidates they were chosen from?"""
    files = run.files(k)
    prompts = {p.id: p.prompt for p in read_records(files["prompts"], PromptRecord)}
    cands = [
        {"prompt": prompts[c.prompt_id]} | scorer(run.root / c.path, prompts[c.prompt_id])
        for c in read_records(files["candidates"], Candidate)
    ]
    pairs = [
        {"prompt": p.prompt} | scorer(run.root / p.path, p.prompt) for p in read_records(files["pairs"], Pair)
    ]
    return {
        "prompts": len(prompts),
        "pairs": len(pairs),
        "candidates_count": _mean(cands, "count"),
        "candidates_exact": _mean(cands, "exact"),
        "pairs_count": _mean(pairs, "count"),
        "pairs_exact": _mean(pairs, "exact"),
        "candidates_count_by_n": _count_by_n(cands),
        "pairs_by_n": {
            n: sum(world.parse_caption(p["prompt"]).count == n for p in pairs) for n in world.COUNTS
        },
    }


def measure_run(run_dir: Path, scorer: Scorer) -> dict:
    """Per iteration: eval metrics per LoRA scale (empty when no LoRA was trained), the selection's quality,
    the gate's decision; and the champion after the last iteration."""
    run = RunDir(run_dir)
    state = read_json(run.champion_path)
    if state is None:
        raise RuntimeError(f"{run.champion_path}: missing or damaged; the run's gate never ran")
    gate = {h["iteration"]: h for h in state["history"]}
    iterations = {
        k: {
            "gate": gate.get(k),
            "scales": measure_eval(run, k, scorer),
            "selection": measure_selection(run, k, scorer),
        }
        for k in run.iterations()
    }
    return {"iterations": iterations, "champion": state["champion"]}


# --------------------------------------------------------------------------------------------------------------
# reporting


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _row(label: str, m: dict) -> str:
    wtl = f"{m['wins']}/{m['ties']}/{m['losses']}" if "wins" in m else "-"
    return (
        f"| {label} | {_pct(m['count'])} | {_pct(m['colour'])} | {_pct(m['background'])} | {_pct(m['exact'])} "
        f"| {m['score']:.2f} | {wtl} | {m['diversity']:.3f} |"
    )


HEADER = (
    "| model | count % | colour % | background % | all right % | eq. 1 score | win/tie/loss vs base | diversity |\n"
    "| --- | ---: | ---: | ---: | ---: | ---: | :---: | ---: |"
)


def final_model(measured: dict) -> tuple[str, dict | None]:
    """The champion after the last iteration, at its accepted scale (None: the gate kept the base)."""
    champ = measured["champion"]
    if champ["iteration"] is None:
        return "base (no LoRA accepted)", None
    k, scale = champ["iteration"], float(champ["scale"])
    return f"iteration {k} LoRA at scale {scale:g}", measured["iterations"][k]["scales"][f"{scale:g}"]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, metric, title in ((axes[0], "count", "count right (%)"), (axes[1], "exact", "all right (%)")):
        base = None
        for name, measured in results.items():
            its = sorted(k for k, e in measured["iterations"].items() if e["scales"])
            if not its:
                continue
            top = max(float(s) for s in measured["iterations"][its[0]]["scales"])
            ys = [100 * measured["iterations"][k]["scales"][f"{top:g}"][metric] for k in its]
            ax.plot(its, ys, marker="o", label=f"{name} (scale {top:g})")
            base = 100 * measured["iterations"][its[0]]["scales"]["0"][metric]
        if base is not None:
            ax.axhline(base, color="gray", linestyle="--", label="base")
        ax.set_xlabel("iteration")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _setup_lines(s: Settings, cfg, base: dict) -> list[str]:
    return [
        "# Does the loop improve the model? Measured on the shapes world",
        "",
        "Generated by `python -m experiments.shapes.proof` (`make proof`); every number below is measured, on "
        f"held-out validation prompts of class **{s.class_name}** ({base['n']} images per row: "
        f"{len(cfg.evaluator.seeds)} fixed seeds per prompt), against the world's ground truth. "
        "The world, its base model and its backends are described in `experiments/shapes/` and "
        "`configs/shapes.yaml`.",
        "",
        f"Setup: {s.iterations} iterations, {cfg.prompter.n_prompts} prompts per iteration, "
        f"N={cfg.generator.num_candidates} candidates, detector threshold {cfg.detector.threshold}, "
        f"LoRA rank {cfg.trainer.rank} lr {cfg.trainer.learning_rate:g} {cfg.trainer.epochs} epochs, "
        f"gate on `{cfg.gate.metric}`, eval scales {cfg.evaluator.scales}.",
    ]


def _final_lines(results: dict, base: dict) -> list[str]:
    lines = [
        "## The final model of each variant against the base",
        "",
        "The final model is the gate's champion after the last iteration, at the scale it was accepted at.",
        "",
        HEADER,
        _row("base (LoRA scale 0)", base),
    ]
    for name, measured in results.items():
        label, m = final_model(measured)
        lines.append(_row(f"{name}: {label}", m) if m else f"| {name}: {label} | = base | | | | | | |")
    return lines


def _change(m: dict, base: dict, key: str, what: str, unit: int) -> str:
    """One measure of the final model against the base, with its bootstrap interval and what it says."""
    lo, hi = m[f"{key}_delta_ci"]
    delta = unit * (m[key] - base[key])
    sign = "better" if lo > 0 else "worse" if hi < 0 else "no clear change"
    points, d = (" points", 1) if unit == 100 else ("", 2)
    return f"{what} {delta:+.{d}f}{points} (95% CI {unit * lo:+.{d}f} to {unit * hi:+.{d}f}: {sign})"


def _verdict_lines(results: dict, base: dict) -> list[str]:
    lines = ["## Verdict", ""]
    for name, measured in results.items():
        label, m = final_model(measured)
        if m is None:
            lines.append(f"- **{name}**: the gate accepted no LoRA; the final model is the base.")
            continue
        measures = (("score", "eq. 1 score", 1), ("exact", "all right", 100), ("count", "count right", 100))
        parts = [_change(m, base, key, what, unit) for key, what, unit in measures]
        lines.append(f"- **{name}** ({label}): " + "; ".join(parts) + ".")
    return lines + [
        "",
        "Intervals: bootstrap over the (prompt, seed) pairs of the evaluation, paired with the base's image of "
        "the same prompt and seed.",
    ]


def _iteration_lines(results: dict) -> list[str]:
    lines = ["## Every iteration at every LoRA scale", ""]
    for name, measured in results.items():
        lines += [f"### {name}: {VARIANTS[name][0]}", "", HEADER]
        for k, e in sorted(measured["iterations"].items()):
            lines += [
                _row(f"iteration {k}, scale {scale}", m) for scale, m in e["scales"].items() if scale != "0"
            ]
            g = e["gate"]
            if g:
                verdict = "accepted" if g["accepted"] else "rejected"
                lines.append(f"| gate after iteration {k}: {verdict} ({g['reason']}) | | | | | | | |")
        lines.append("")
    return lines


def _selection_lines(results: dict) -> list[str]:
    lines = [
        "## Selection: are the chosen pairs better than the candidates?",
        "",
        "| variant | iteration | prompts | pairs | candidates count % | pairs count % | candidates all right % "
        "| pairs all right % |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, measured in results.items():
        for k, e in sorted(measured["iterations"].items()):
            sel = e["selection"]
            lines.append(
                f"| {name} | {k} | {sel['prompts']} | {sel['pairs']} | {_pct(sel['candidates_count'])} "
                f"| {_pct(sel['pairs_count'])} | {_pct(sel['candidates_exact'])} | {_pct(sel['pairs_exact'])} |"
            )
    return lines


def _count_by_n_lines(results: dict, base: dict) -> list[str]:
    lines = [
        "### Count right, by the number the prompt asks for",
        "",
        "Candidates: share of the ten drawn per prompt with the right count (best-of-10 can only pick what "
        "was drawn); pairs: how many pairs asked for that number; then the held-out evaluation, base and final model.",
        "",
        "| variant | iteration | " + " | ".join(f"{n}: candidates % / pairs" for n in world.COUNTS) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in world.COUNTS) + " |",
    ]
    for name, measured in results.items():
        for k, e in sorted(measured["iterations"].items()):
            sel = e["selection"]
            cells = [
                f"{_pct(sel['candidates_count_by_n'][n])} / {sel['pairs_by_n'][n]}" for n in world.COUNTS
            ]
            lines.append(f"| {name} | {k} | " + " | ".join(cells) + " |")
    lines += ["", "| held-out evaluation | " + " | ".join(f"{n}: count %" for n in world.COUNTS) + " |"]
    lines += ["| --- | " + " | ".join("---:" for _ in world.COUNTS) + " |"]
    lines.append("| base | " + " | ".join(_pct(base["count_by_n"][n]) for n in world.COUNTS) + " |")
    for name, measured in results.items():
        label, m = final_model(measured)
        if m is not None:
            lines.append(
                f"| {name}: {label} | " + " | ".join(_pct(m["count_by_n"][n]) for n in world.COUNTS) + " |"
            )
    return lines


def _time_lines(timings: dict, base_info: dict | None) -> list[str]:
    lines = ["## Time", ""] + [f"- {k}: {v / 60:.1f} min" for k, v in timings.items()]
    if base_info:
        secs = base_info["seconds"]
        c = base_info["config"]
        lines.append(
            f"- base model training, from its record: {sum(secs.values()) / 60:.1f} min (render "
            f"{secs['render']:.0f} s, VAE {secs['vae']:.0f} s, UNet {secs['unet']:.0f} s; {c['images']} scenes, "
            f"{c['vae_steps']} VAE and {c['unet_steps']} UNet steps, {c['threads']} thread(s), count label noise "
            f"{c['count_label_noise']}); its VAE round trip keeps {100 * base_info['vae_reconstruction_exact']:.0f}% "
            "of scenes measurably exact"
        )
    return lines


COLUMNS = (
    "Columns: *count/colour/background %*: share of images whose measured count (objects of the "
    "class), colour or background equals the prompt's; *all right*: all three and no other shape; "
    "*eq. 1 score*: the measuring judge's mean score (max 10); *win/tie/loss*: per (prompt, seed) "
    "against the same seed at scale 0; *diversity*: mean absolute pixel difference between the seeds "
    "of a prompt (a collapsed model tends to 0)."
)


def write_report(
    s: Settings,
    results: dict,
    timings: dict,
    path: Path,
    plot_name: str | None,
    base_info: dict | None = None,
) -> str:
    """docs/proof.md: setup, the final models against the base, verdict, every iteration, selection, time."""
    cfg = load_config(s.config, s.overrides)
    evaluated = [e for m in results.values() for _, e in sorted(m["iterations"].items()) if e["scales"]]
    if not evaluated:
        raise RuntimeError(
            "no iteration of any variant was evaluated (no pairs, so no LoRA): nothing to compare"
        )
    base = evaluated[0]["scales"]["0"]
    lines = _setup_lines(s, cfg, base) + [""] + _final_lines(results, base) + [""]
    lines += _verdict_lines(results, base) + [""] + _iteration_lines(results)
    lines += _selection_lines(results) + [""] + _count_by_n_lines(results, base)
    if plot_name:
        lines += ["", f"![count and all-right accuracy by iteration]({plot_name})"]
    lines += [""] + _time_lines(timings, base_info) + ["", COLUMNS, ""]
    text = "\n".join(lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return text


# --------------------------------------------------------------------------------------------------------------


def run_variants(s: Settings, timings: dict[str, float]) -> dict[str, Path]:
    """Every variant's loop, ``s.jobs`` side by side; their run folders (the seconds each took go to timings)."""
    run_dirs = {}
    if s.jobs > 1 and len(s.variants) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: the parent has torch (and its thread pool) loaded already.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            s.jobs, mp_context=ctx, initializer=_init_worker, initargs=(s.threads,)
        ) as pool:
            futures = {name: pool.submit(run_variant, s, name) for name in s.variants}
            for name, future in futures.items():
                run_dirs[name], timings[f"loop, {name}"] = future.result()
    else:
        for name in s.variants:
            run_dirs[name], timings[f"loop, {name}"] = run_variant(s, name)
    return run_dirs


def prove(s: Settings) -> dict:
    started = time.perf_counter()
    if s.fresh and s.work_dir.exists():
        shutil.rmtree(s.work_dir)
    s.work_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    # Config and validation prompts first: a bad setting fails in a second, not after the base model's training.
    cfg = load_config(s.config, s.overrides)
    val = world.validation_captions(s.class_name, cfg.prompter.n_validation)
    base_path, timings["base model (build or cache)"] = build_base(s)
    s = dataclasses.replace(s, base_model=str(base_path))
    base_info = read_json(base_path / "shapes_base_model.json", default=None)
    (s.work_dir / f"validation-{s.class_name}.txt").write_text("\n".join(val) + "\n", encoding="utf-8")
    t = time.perf_counter()
    run_dirs = run_variants(s, timings)
    timings[f"loops, wall clock ({s.jobs} side by side)"] = time.perf_counter() - t
    scorer = Scorer(s)
    t = time.perf_counter()
    results = {name: measure_run(d, scorer) for name, d in run_dirs.items()}
    timings["measuring"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - started
    plot(results, s.work_dir / "proof.png")
    if s.out.parent.resolve() != s.work_dir.resolve():
        s.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(s.work_dir / "proof.png", s.out.parent / "proof.png")
    text = write_report(s, results, timings, s.out, "proof.png", base_info)
    (s.work_dir / "proof.md").write_text(text, encoding="utf-8")
    (s.work_dir / "proof.json").write_text(
        json.dumps({"results": results, "timings": timings}, indent=1, default=str), encoding="utf-8"
    )
    logger.info("proof written to %s (%.1f min)", s.out, timings["total"] / 60)
    return {"results": results, "timings": timings}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.shapes.proof", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--class", dest="class_name", default=Settings.class_name, choices=world.CLASSES)
    parser.add_argument("--iterations", type=int, default=Settings.iterations)
    parser.add_argument("--work-dir", type=Path, default=Settings.work_dir)
    parser.add_argument("--out", type=Path, default=Settings.out)
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument(
        "--base-model", help="a trained base model folder (default: the cached one, trained first if missing)"
    )
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (results depend on it; 1 is the default)"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="variants run side by side in this many processes (each --threads)",
    )
    parser.add_argument("--fresh", action="store_true", help="delete the work folder, retrain the base model")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 1 iteration, 3 prompts, the full loop only"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    s = Settings(
        class_name=args.class_name,
        iterations=1 if args.quick else args.iterations,
        work_dir=args.work_dir,
        out=args.out,
        config=args.config,
        base_model=args.base_model,
        variants=["ccsr"] if args.quick and args.variants == list(VARIANTS) else args.variants,
        overrides=(QUICK if args.quick else []) + args.set,
        fresh=args.fresh,
        jobs=args.jobs,
        threads=args.threads,
    )
    prove(s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
