"""``make proof``: does the CCSR loop improve a text-to-image model? Measured on the shapes world, by a
protocol fixed before the run (``PROTOCOL``).

The base model of the shapes world draws a purple circle for a purple-circle prompt only some of the time
(``base_model``'s targeted weakness). The proof asks whether the loop fixes that on held-out prompts: every
final model (the gate's champion of each loop variant, at its scale) draws the held-out purple-circle prompts
at fixed seeds never used to choose settings, and each image is measured against the world's ground truth.
The primary metric is the share of images whose circles are all purple (at least one circle measured); each
model is compared with the base image by image, with a paired bootstrap interval.

The variants: the base; best-of-10 (the loop's selection without training: what the judge's picks are
worth); the loop as configured (``ccsr``), the paper's recipe (``paper``), Diffusion-DPO, and ablations
(without the judge, the detector filter, the gate); ``ground-truth``, a LoRA trained on correct renders of
the ``ccsr`` run's prompts with the same step budget (what perfect selection could teach).

Outputs, in ``--out-dir``: ``proof.json`` (the numbers), ``proof-results.md`` (tables generated from
proof.json) and ``proof-grid.png`` (the same seeds drawn by the base and the main models). docs/proof.md is
written by hand (the protocol and the reading of the results) and never touched here.

    python -m experiments.shapes.proof --fresh --jobs 2   # make proof: from scratch, the reported run
    python -m experiments.shapes.proof --dev              # choosing settings: other seeds, other loop seed
    python -m experiments.shapes.proof --quick --base-model DIR --work-dir DIR  # smoke run

The base model is ``base_model.cached_base_model()``'s folder (trained there the first time; with ``--fresh``
in the work folder) unless ``--base-model`` names one; every run gets it as ``generator.model``. Without
``--out-dir``, the reported run writes to docs/, a ``--dev`` or ``--quick`` run to its work folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import shutil
import time
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np

from ccsr.config import Config
from ccsr.config_files import REPO_ROOT, load_config, resolve_data_path
from ccsr.records import Candidate, EvalRecord, Pair, PromptRecord, read_records
from ccsr.roles import JudgeRequest
from ccsr.rundir import RunDir, read_json
from experiments.shapes import measure_final, world
from experiments.shapes.base_model import cached_base_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Protocol:
    """What is measured, on what, fixed before the reported run."""

    class_name: str = "circle"
    target_colour: str = "purple"
    final_seeds: range = range(1000, 1128)  # the reported run's seeds
    dev_seeds: range = range(500, 628)  # the seeds settings were chosen on (--dev)
    best_of_n: int = 10
    best_of_n_groups: int = 32  # seeds per prompt of the best-of-n row (the first of the seed set)
    primary_metric: str = "purple-circle colour accuracy (%), held-out prompts"

    def target_specs(self) -> list[world.SceneSpec]:
        """The held-out (count, background) combinations of the class in the target colour."""
        return [s for s in world.validation_specs(self.class_name) if s.colour == self.target_colour]

    def target_prompts(self) -> list[str]:
        return [world.caption(s) for s in self.target_specs()]


PROTOCOL = Protocol()

CONFIG = REPO_ROOT / "configs" / "shapes.yaml"
RANDOM_JUDGE = "judge.backend=experiments.shapes.backends:RandomJudge"
SFT_BATCH = "trainer.batch_size=8"  # 8 images a step, as a DPO step of the shapes config's 4 pairs
# The paper's recipe over configs/shapes.yaml: the single best image per prompt, the plain denoising loss.
PAPER_RECIPE = [
    "filter.top_k=1",
    "filter.min_score=null",
    "trainer.prior_weight=0",
    "trainer.objective=sft",
    SFT_BATCH,
    "trainer.reward_weighted=false",
]
# Replay (Lee et al.'s pre-training term): the base model's own images of the class's loop captions.
REPLAY = [
    "trainer.prior_weight=1",
    "trainer.prior_images=60",
    "trainer.prior_prompts="
    + json.dumps([world.caption(spec) for spec in world.training_specs(PROTOCOL.class_name)]),
]
# name -> (what it is, kind, overrides of configs/shapes.yaml). Kinds: "measure" (the base model, drawn and
# measured), "loop" (a `ccsr run`, then its champion measured), "ground-truth" (after the ccsr variant).
VARIANTS: dict[str, tuple[str, str, list[str]]] = {
    "base": ("the base model", "measure", []),
    "best-of-10": (
        "per prompt and seed, the judge's and detector's pick of 10 base images (no training)",
        "measure",
        [],
    ),
    "ccsr": (
        "the loop as configured (configs/shapes.yaml): Diffusion-DPO on (pick, lower-scored candidate) pairs",
        "loop",
        [],
    ),
    "paper": (
        "the paper's recipe: one image per prompt, no min score, plain denoising loss",
        "loop",
        PAPER_RECIPE,
    ),
    "no-judge": (
        "the ccsr loop with a judge that answers at random (its random scores rarely reach min score 8)",
        "loop",
        [RANDOM_JUDGE],
    ),
    "paper-no-judge": (
        "the paper's recipe with a judge that answers at random: one random pick per prompt",
        "loop",
        [RANDOM_JUDGE, *PAPER_RECIPE],
    ),
    "sft-top3": (
        "the ccsr loop's picks (top 3, min score 8) with the plain denoising loss instead of DPO",
        "loop",
        ["trainer.objective=sft", SFT_BATCH],
    ),
    "top3-replay": (
        "the ccsr loop's picks with the plain loss, plus replay: 60 base images of loop captions, weight 1",
        "loop",
        ["trainer.objective=sft", SFT_BATCH, *REPLAY],
    ),
    "dpo-sft": (
        "the ccsr loop plus the plain denoising loss on the picks (weight 1)",
        "loop",
        ["trainer.dpo_sft_weight=1"],
    ),
    "no-detector": (
        "detector threshold 0: no image is filtered out",
        "loop",
        ["filter.detection_threshold=0"],
    ),
    "no-gate": ("every LoRA is accepted, better or not", "loop", ["gate.enabled=false"]),
    "ground-truth": (
        "one LoRA on correct renders of the ccsr run's prompts, the ccsr run's total steps",
        "ground-truth",
        [],
    ),
}
QUICK = [
    "prompter.n_prompts=3",
    "prompter.n_validation=2",
    "generator.num_candidates=4",
    "generator.steps=4",
    "trainer.epochs=2",
    "trainer.max_steps=null",
    "trainer.batch_size=2",
    "filter.min_score=null",
    "evaluator.seeds=[0]",
    "evaluator.scales=[0.0, 1.0]",
]
# What `make proof` runs: every variant but three measured in the second reported run and not repeated
# (docs/proof.md: dpo-sft, paper-no-judge, sft-top3), so that three iterations fit in the hour.
DEFAULT_VARIANTS = [
    "base",
    "best-of-10",
    "ccsr",
    "paper",
    "no-judge",
    "no-detector",
    "no-gate",
    "ground-truth",
]
# A variant that reads another's results starts after it (side by side, the others go on meanwhile).
NEEDS = {"best-of-10": "base", "ground-truth": "ccsr"}
QUICK_VARIANTS = ["base", "best-of-10", "ccsr", "no-judge", "ground-truth"]
QUICK_SEEDS = 2
# The grid: these models (when measured), one row each per target prompt, the first GRID_SEEDS seeds.
GRID_MODELS = ("base", "ccsr", "paper", "ground-truth")
GRID_SEEDS = 8
GRID_SCALE = 2  # nearest-neighbour upscaling of the 64 px images
GRID_LABEL_WIDTH = 100  # the model names' column
GRID_STRIP = 16  # the seeds' header and each prompt's heading


@dataclass
class Settings:
    protocol: Protocol = PROTOCOL
    dev: bool = False  # the dev seeds and loop seed 1 (choosing settings), not the reported run
    iterations: int = 3
    work_dir: Path = REPO_ROOT / "runs" / "proof"
    out_dir: Path = REPO_ROOT / "docs"
    config: Path = CONFIG
    base_model: str | None = None  # a folder; default: base_model.cached_base_model() (trained once, cached)
    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS))
    overrides: list[str] = field(default_factory=list)  # for every run
    fresh: bool = False
    jobs: int = 1  # variants run side by side in this many processes
    threads: int = 1  # torch CPU threads per process

    @property
    def seeds(self) -> range:
        return self.protocol.dev_seeds if self.dev else self.protocol.final_seeds

    def final_dir(self, name: str) -> Path:
        return self.work_dir / "final" / name


def check_variants(variants: list[str]) -> None:
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    for name in variants:
        needed = NEEDS.get(name)
        if needed not in (None, "base", *variants):  # the base is always measured
            raise ValueError(f"variant {name} reads the {needed} run's results: add {needed} to --variants")


# --------------------------------------------------------------------------------------------------------------
# the loops


def _model_cache(s: Settings) -> Path | None:
    # --fresh builds the base model in the work folder, so "from scratch" really retrains it.
    return s.work_dir / "models" if s.fresh else None


def common_overrides(s: Settings) -> list[str]:
    """The overrides of every config of the proof: the shared ones, the base model, its cache."""
    out = list(s.overrides) + [f"generator.model={s.base_model}"]
    cache = _model_cache(s)
    return out + ([f"model_cache={cache}"] if cache is not None else [])


def run_loop(s: Settings, name: str) -> Path:
    """``ccsr run`` of a loop variant into ``work_dir/name``; with ``--dev`` under loop seed 1."""
    from ccsr.cli import main as ccsr_main

    run_dir = s.work_dir / name
    overrides = common_overrides(s) + VARIANTS[name][2]
    overrides.append(f"prompter.validation_file={s.work_dir / f'validation-{s.protocol.class_name}.txt'}")
    if s.dev:
        overrides.append("seed=1")
    argv = ["run", "--config", str(s.config), "--class", s.protocol.class_name, "--run-dir", str(run_dir)]
    argv += ["--iterations", str(s.iterations)]
    for o in overrides:
        argv += ["--set", o]
    logger.info("variant %s: ccsr %s", name, " ".join(argv))
    code = ccsr_main(argv)
    if code != 0:
        raise RuntimeError(f"variant {name}: ccsr run exited with {code} (see {run_dir}/log.txt)")
    return run_dir


def build_base(s: Settings) -> Path:
    """The base model's folder, trained first if it is not cached yet."""
    return Path(s.base_model) if s.base_model else cached_base_model(_model_cache(s))


# --------------------------------------------------------------------------------------------------------------
# the ground-truth variant


def trained_steps(run: RunDir) -> int:
    """The optimizer steps the run's LoRAs took, summed over its iterations (the train stage records them)."""
    return sum(run.stages_done(k).get("train", {}).get("steps", 0) for k in run.iterations())


def ground_truth_pairs(run: RunDir, per_prompt: int, folder: Path) -> list:
    """``per_prompt`` correct renders of every prompt of every iteration of ``run``, saved into ``folder``."""
    from ccsr.training_data import TrainPair

    folder.mkdir(parents=True, exist_ok=True)
    pairs = []
    for k in run.iterations():
        for p in read_records(run.files(k)["prompts"], PromptRecord):
            spec = world.parse_caption(p.prompt)
            if spec is None:
                raise ValueError(f"{run.root}: prompt {p.id} {p.prompt!r} is not a caption of the grammar")
            for j in range(per_prompt):
                rng = random.Random(f"ground-truth:{p.id}:{j}")
                path = folder / f"{p.id}-{j:02d}.png"
                world.render(spec, world.place_objects(spec, rng)).save(path)
                pairs.append(TrainPair(p.prompt, path, 10.0))  # a correct render: the judge's maximum
    return pairs


def train_ground_truth(s: Settings) -> tuple[Config, Path, dict]:
    """One LoRA on correct renders of the ccsr run's prompts, with that run's config and its total steps
    (the config's own budget when it trained nothing). Objective sft: correct renders have no losers."""
    from ccsr.train import train_lora

    run = RunDir(s.work_dir / "ccsr")
    saved = load_config(run.config_path)
    steps = trained_steps(run)
    overrides = [f"trainer.max_steps={steps}"] if steps else []
    if saved.trainer.objective == "dpo":
        # A DPO step sees batch_size (winner, loser) pairs: 2 x batch_size images, as many as this SFT step.
        overrides += [
            "trainer.objective=sft",
            "trainer.dpo_sft_weight=0",
            f"trainer.batch_size={2 * saved.trainer.batch_size}",
        ]
    cfg = load_config(run.config_path, overrides)
    folder = s.work_dir / "ground-truth"
    pairs = ground_truth_pairs(run, cfg.filter.top_k, folder / "images")
    logger.info("ground-truth: training one LoRA on %d renders (%s steps)", len(pairs), steps or "config")
    result = train_lora(cfg, pairs, folder / "lora")
    return cfg, result.lora_dir, {"images": len(pairs), "steps": result.steps}


# --------------------------------------------------------------------------------------------------------------
# the loop's own evaluation and selection, measured (per iteration; the reported numbers are in measure_final)


class Scorer:
    """Ground-truth accuracy and the measuring judge's eq. (1) score of one image, whatever the run's judge."""

    def __init__(self, s: Settings):
        from ccsr.questions import QuestionSet
        from experiments.shapes.backends import MeasuringJudge

        cfg = load_config(s.config, class_name=s.protocol.class_name)
        self.judge = MeasuringJudge(cfg)
        self.questions = QuestionSet.load(resolve_data_path(cfg.judge.questions))
        self.class_name = s.protocol.class_name

    def __call__(self, path: Path, prompt: str) -> dict:
        from PIL import Image

        image = Image.open(path).convert("RGB")
        spec = world.parse_caption(prompt)
        if spec is None:
            raise ValueError(f"{path}: prompt {prompt!r} is not a caption of the shapes grammar")
        acc = world.accuracy(spec, world.measure(image))
        request = JudgeRequest.rendered(self.questions, self.class_name, prompt)
        answer = self.judge.answer([image], [request])[0]
        return {
            "count": acc.count,
            "colour": acc.colour,
            "background": acc.background,
            "exact": acc.exact,
            "score": self.questions.score(answer.answers),
            "pixels": np.asarray(image.resize((32, 32)), dtype=np.float32) / 255.0,
        }


def _diversity(rows: list[dict]) -> float | None:
    """Mean absolute pixel difference between images of the same prompt (different seeds); 0 = collapse."""
    by_prompt: dict[str, list[np.ndarray]] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_id"], []).append(r["pixels"])
    diffs = [float(np.abs(a - b).mean()) for imgs in by_prompt.values() for a, b in combinations(imgs, 2)]
    return round(float(np.mean(diffs)), 4) if diffs else None  # one seed per prompt: nothing to compare


def _count_by_n(rows: list[dict]) -> dict[int, float | None]:
    """Share of rows whose measured count is right, per requested count (rows carry their prompt)."""
    out: dict[int, float | None] = {}
    for n in world.COUNTS:
        hits = [r["count"] for r in rows if world.parse_caption(r["prompt"]).count == n]
        out[n] = round(float(np.mean(hits)), 4) if hits else None
    return out


def _summary(rows: list[dict], base: dict[tuple, dict]) -> dict:
    n = len(rows)
    out = {k: round(sum(r[k] for r in rows) / n, 4) for k in ("count", "colour", "background", "exact")}
    out["score"] = round(sum(r["score"] for r in rows) / n, 3)
    out["diversity"] = _diversity(rows)
    out["count_by_n"] = _count_by_n(rows)
    out["n"] = n
    diffs = [r["score"] - base[(r["prompt_id"], r["seed"])]["score"] for r in rows]
    out["wins"] = sum(d > 0 for d in diffs)
    out["ties"] = sum(d == 0 for d in diffs)  # integer scores: paper's |diff| < 0.01 is equality
    out["losses"] = sum(d < 0 for d in diffs)
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
        "candidates_colour": _mean(cands, "colour"),
        "pairs_colour": _mean(pairs, "colour"),
        "candidates_count": _mean(cands, "count"),
        "pairs_count": _mean(pairs, "count"),
        "candidates_exact": _mean(cands, "exact"),
        "pairs_exact": _mean(pairs, "exact"),
    }


def measure_run(run_dir: Path, scorer: Scorer) -> dict:
    """Per iteration: the loop's evaluation measured per LoRA scale (empty when no LoRA was trained), the
    selection's quality, the gate's decision; and the champion after the last iteration."""
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
# one variant's work (in a worker process with --jobs > 1)


def _timed(seconds: dict[str, float], stage: str, work, *args, **kwargs):
    start = time.perf_counter()
    out = work(*args, **kwargs)
    seconds[stage] = round(time.perf_counter() - start, 1)
    return out


def final_model(
    s: Settings, name: str, seconds: dict[str, float]
) -> tuple[Config | None, Path | None, float, dict]:
    """Variant ``name``'s loop or training, if it has one, then what its final model is: the config to draw
    with (None: the base, whose rows are reused), the LoRA and its scale, and what to record about it."""
    from ccsr.gate import current_champion

    kind = VARIANTS[name][1]
    if kind == "measure":
        cfg = load_config(s.config, common_overrides(s), class_name=s.protocol.class_name)
        return cfg, None, 0.0, {"model": "the base model"}
    if kind == "ground-truth":
        cfg, lora, info = _timed(seconds, "train", train_ground_truth, s)
        model = f"LoRA at scale 1 ({info['steps']} steps on {info['images']} renders)"
        return cfg, lora, 1.0, {"model": model, "ground_truth": info}
    run = RunDir(_timed(seconds, "loop", run_loop, s, name))
    record = {"loop": _timed(seconds, "loop measured", measure_run, run.root, Scorer(s))}
    lora, scale = current_champion(run)
    if lora is None:
        return None, None, 0.0, record | {"champion": None, "model": "base (no LoRA accepted)"}
    k = record["loop"]["champion"]["iteration"]
    record |= {
        "champion": {"iteration": k, "scale": scale},
        "model": f"iteration {k} LoRA at scale {scale:g}",
    }
    return load_config(run.config_path), lora, scale, record


def run_task(s: Settings, name: str) -> dict:
    """One variant, start to end: its final model drawn and measured into ``final/<name>``. Returns what
    ``final_model`` records, ``rows`` (None: the final model is the base) and ``seconds``."""
    prompts, seeds = s.protocol.target_prompts(), list(s.seeds)
    folder = s.final_dir(name)
    shutil.rmtree(folder, ignore_errors=True)  # images of another seed set must not linger
    seconds: dict[str, float] = {}
    if name == "best-of-10":
        cfg = load_config(s.config, common_overrides(s), class_name=s.protocol.class_name)
        n, groups = s.protocol.best_of_n, seeds[: s.protocol.best_of_n_groups]
        start = time.perf_counter()
        rows, info = measure_final.best_of_n(cfg, prompts, groups, n, s.final_dir("base"), folder)
        out = {"model": f"best of {n} base images", "best_of_n": info, "rows": rows}
    else:
        cfg, lora, scale, out = final_model(s, name, seconds)
        start = time.perf_counter()
        if cfg is not None:
            out["rows"] = measure_final.draw_and_measure(cfg, prompts, seeds, folder, lora, scale, name)
        else:
            out["rows"] = None
    seconds["final images"] = round(time.perf_counter() - start, 1)
    return out | {"seconds": seconds}


def _init_worker(threads: int) -> None:
    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(threads)


def schedule(names: list[str]) -> list[str]:
    """The order variants start in: the loops first (the longest work; the paper's plain loss is the shortest
    loop), then the measurements that read other variants' results (``NEEDS``)."""
    kind = {n: VARIANTS[n][1] for n in names}
    loops = [n for n in names if kind[n] == "loop"]
    loops.sort(key=lambda n: n == "paper")
    return (
        loops + [n for n in names if kind[n] != "loop" and n not in NEEDS] + [n for n in names if n in NEEDS]
    )


def run_tasks(s: Settings, names: list[str]) -> dict[str, dict]:
    """``run_task`` of every name, ``s.jobs`` side by side, each as soon as what it ``NEEDS`` is done."""
    order = schedule(names)
    if s.jobs <= 1 or len(names) <= 1:
        return {name: run_task(s, name) for name in order}
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    # spawn, not fork: the parent has torch (and its thread pool) loaded already.
    ctx = multiprocessing.get_context("spawn")
    done: dict[str, dict] = {}
    running: dict = {}
    with ProcessPoolExecutor(s.jobs, mp_context=ctx, initializer=_init_worker, initargs=(s.threads,)) as pool:
        while order or running:
            ready = [n for n in order if NEEDS.get(n) not in {*order, *running.values()}]
            while ready and len(running) < s.jobs:
                name = ready.pop(0)
                order.remove(name)
                running[pool.submit(run_task, s, name)] = name
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                done[running.pop(future)] = future.result()
    return done


# --------------------------------------------------------------------------------------------------------------
# outputs: proof.json, the tables generated from it, the grid


def _verdict(final: dict) -> str:
    lo, hi = final["ci95"]
    return "improved" if lo > 0 else "worse" if hi < 0 else "no clear change"


def _cell(m: dict) -> str:
    lo, hi = m["ci95"]
    return f"{m['value']:.1f} ({m['delta_vs_base']:+.1f}, {lo:+.1f} to {hi:+.1f})"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


LOOP_HEADER = (
    "| model | count % | colour % | background % | all right % | eq. 1 score | win/tie/loss vs base | diversity |\n"
    "| --- | ---: | ---: | ---: | ---: | ---: | :---: | ---: |"
)


def _loop_row(label: str, m: dict) -> str:
    diversity = "-" if m["diversity"] is None else f"{m['diversity']:.3f}"
    return (
        f"| {label} | {_pct(m['count'])} | {_pct(m['colour'])} | {_pct(m['background'])} | {_pct(m['exact'])} "
        f"| {m['score']:.2f} | {m['wins']}/{m['ties']}/{m['losses']} | {diversity} |"
    )


def _final_lines(results: dict) -> list[str]:
    p = results["protocol"]
    lines = [
        f"## {results['primary_metric']}",
        "",
        f"Target prompts ({p['class']}, {p['colour']}, held-out combinations): "
        + "; ".join(f"*{t}*" for t in p["target_prompts"])
        + f". Seeds: the {p['seed_set']} set, {p['seeds'][0]} to {p['seeds'][1] - 1}, the same for every model. "
        "Delta and 95% CI: in points against the base's image of the same prompt and seed (paired bootstrap).",
        "",
        "| variant | what | final model | value % | delta (points) | 95% CI | images | verdict |",
        "| --- | --- | --- | ---: | ---: | :---: | ---: | --- |",
    ]
    for name, v in results["variants"].items():
        f = v["final"]
        verdict = "reference" if name == "base" else _verdict(f)
        lines.append(
            f"| {name} | {v['description']} | {v['model']} | {f['value']:.1f} | {f['delta_vs_base']:+.1f} "
            f"| {f['ci95'][0]:+.1f} to {f['ci95'][1]:+.1f} | {f['images']} | {verdict} |"
        )
    return lines


def _secondary_lines(results: dict) -> list[str]:
    return [
        "## Secondary metrics",
        "",
        "Per cell: value % (delta in points, 95% CI). *count*: the number of circles is right; *exact*: count, "
        "colour, background right and no other shape; *any-shape colour*: at least one object and every object, "
        "whatever its shape, in the prompt's colour.",
        "",
        "| variant | count | exact | any-shape colour |",
        "| --- | :---: | :---: | :---: |",
        *(
            f"| {name} | " + " | ".join(_cell(v["secondary"][m]) for m in measure_final.SECONDARY) + " |"
            for name, v in results["variants"].items()
        ),
    ]


def _iteration_lines(results: dict) -> list[str]:
    lines = [
        "## The loop's own evaluation, every iteration at every LoRA scale",
        "",
        "The evaluation images each loop saved (all held-out prompts of the class, the config's evaluator "
        "seeds), measured; the gate decided on these.",
        "",
    ]
    for name, v in results["variants"].items():
        if "loop" not in v:
            continue
        lines += [f"### {name}: {v['description']}", "", LOOP_HEADER]
        for k, e in sorted(v["loop"]["iterations"].items(), key=lambda kv: int(kv[0])):
            for scale, m in e["scales"].items():
                lines.append(
                    _loop_row(f"iteration {k}, " + ("base" if scale == "0" else f"scale {scale}"), m)
                )
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
        "| variant | iteration | prompts | pairs | candidates colour % | pairs colour % | candidates count % "
        "| pairs count % | candidates all right % | pairs all right % |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, v in results["variants"].items():
        for k, e in sorted(v.get("loop", {}).get("iterations", {}).items(), key=lambda kv: int(kv[0])):
            sel = e["selection"]
            cells = [sel["prompts"], sel["pairs"]] + [
                _pct(sel[f"{who}_{m}"])
                for m in ("colour", "count", "exact")
                for who in ("candidates", "pairs")
            ]
            lines.append(f"| {name} | {k} | " + " | ".join(str(c) for c in cells) + " |")
    return lines


def write_results(results: dict, path: Path) -> None:
    """proof-results.md: the tables of ``results`` (proof.json as read back), nothing else."""
    lines = [
        "<!-- Generated by `make proof` (python -m experiments.shapes.proof) from proof.json: do not edit by "
        "hand. The protocol and the reading of these numbers are in docs/proof.md. -->",
        "",
        "# Shapes-world proof: the measured results",
        "",
        *_final_lines(results),
        "",
        *_secondary_lines(results),
        "",
        *_iteration_lines(results),
        *_selection_lines(results),
        "",
        "## Time",
        "",
        f"Total {results['minutes']:.1f} min.",
        "",
        *(f"- {stage}: {secs / 60:.1f} min" for stage, secs in results["seconds"].items()),
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")


def draw_grid(s: Settings, models: list[str], path: Path) -> None:
    """For each target prompt, one row per model of the first GRID_SEEDS seeds (the same for every model),
    upscaled GRID_SCALE times with nearest neighbour, from the saved final images."""
    from PIL import Image, ImageDraw

    prompts, seeds = s.protocol.target_prompts(), list(s.seeds)[:GRID_SEEDS]
    side = world.SIZE * GRID_SCALE
    width = GRID_LABEL_WIDTH + len(seeds) * side
    height = GRID_STRIP + len(prompts) * (GRID_STRIP + len(models) * side)
    sheet = Image.new("RGB", (width, height), "white")
    pen = ImageDraw.Draw(sheet)
    for c, seed in enumerate(seeds):
        pen.text((GRID_LABEL_WIDTH + c * side + 2, 2), f"seed {seed}", fill="black")
    top = GRID_STRIP
    for i, prompt in enumerate(prompts):
        pen.text((2, top + 2), prompt, fill="black")
        top += GRID_STRIP
        for model in models:
            pen.text((2, top + side // 2 - 6), model, fill="black")
            for c, seed in enumerate(seeds):
                image = Image.open(measure_final.image_path(s.final_dir(model), i, seed)).convert("RGB")
                sheet.paste(
                    image.resize((side, side), Image.Resampling.NEAREST), (GRID_LABEL_WIDTH + c * side, top)
                )
            top += side
    sheet.save(path)


def _protocol_record(s: Settings) -> dict:
    p = s.protocol
    return {
        "class": p.class_name,
        "colour": p.target_colour,
        "target_prompts": p.target_prompts(),
        "seed_set": "dev" if s.dev else "final",
        "seeds": [s.seeds.start, s.seeds.stop],  # start, stop (excluded)
        "loop_seed": 1 if s.dev else load_config(s.config, s.overrides).seed,
        "best_of_n": p.best_of_n,
        "best_of_n_groups": p.best_of_n_groups,
        "iterations": s.iterations,
        "overrides": s.overrides,
    }


def collect(s: Settings, done: dict[str, dict], seconds: dict[str, float], started: float) -> dict:
    """proof.json's content: every variant against the base (a final model that is the base reuses the
    base's rows and images)."""
    base_rows = done["base"]["rows"]
    variants = {}
    for name in s.variants:
        out = done[name]
        rows = out["rows"]
        if rows is None:
            shutil.copytree(s.final_dir("base"), s.final_dir(name), dirs_exist_ok=True)
            rows = base_rows
        v = {"description": VARIANTS[name][0], "model": out["model"]}
        v |= measure_final.compare(rows, base_rows)
        v |= {k: out[k] for k in ("champion", "loop", "best_of_n", "ground_truth") if k in out}
        variants[name] = v
        seconds |= {f"{name}: {stage}": secs for stage, secs in out["seconds"].items()}
    base = variants["base"]
    seconds["total"] = round(time.perf_counter() - started, 1)
    return {
        "primary_metric": s.protocol.primary_metric,
        "minutes": round(seconds["total"] / 60, 2),
        "protocol": _protocol_record(s),
        "base": {"value": base["final"]["value"], "images": base["final"]["images"]}
        | {"secondary": {m: base["secondary"][m]["value"] for m in measure_final.SECONDARY}},
        "variants": variants,
        "seconds": seconds,
    }


def prove(s: Settings) -> dict:
    """The whole proof: base model, loops and variants, final measurement, proof.json and its views."""
    check_variants(s.variants)
    # The base is every comparison's reference; the tables keep VARIANTS' order.
    s = dataclasses.replace(s, variants=[n for n in VARIANTS if n == "base" or n in s.variants])
    started = time.perf_counter()
    if s.fresh and s.work_dir.exists():
        shutil.rmtree(s.work_dir)
    s.work_dir.mkdir(parents=True, exist_ok=True)
    # Config and validation prompts first: a bad setting fails in a second, not after the base model's training.
    cfg = load_config(s.config, s.overrides, class_name=s.protocol.class_name)
    val = world.validation_captions(s.protocol.class_name, cfg.prompter.n_validation)
    seconds: dict[str, float] = {}
    base_path = _timed(seconds, "base model (build or cache)", build_base, s)
    s = dataclasses.replace(s, base_model=str(base_path))
    (s.work_dir / f"validation-{s.protocol.class_name}.txt").write_text(
        "\n".join(val) + "\n", encoding="utf-8"
    )
    done = _timed(seconds, f"variants, wall clock ({s.jobs} side by side)", run_tasks, s, s.variants)
    results = collect(s, done, seconds, started)
    s.out_dir.mkdir(parents=True, exist_ok=True)
    json_path = s.out_dir / "proof.json"
    json_path.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    write_results(json.loads(json_path.read_text(encoding="utf-8")), s.out_dir / "proof-results.md")
    draw_grid(s, [m for m in GRID_MODELS if m in s.variants], s.out_dir / "proof-grid.png")
    logger.info("proof written to %s (%.1f min)", s.out_dir, results["minutes"])
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.shapes.proof", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--iterations", type=int, default=Settings.iterations)
    parser.add_argument("--work-dir", type=Path, help="default runs/proof (runs/proof-dev with --dev)")
    parser.add_argument(
        "--out-dir",
        type=Path,
        help="proof.json and its views (default docs/; the work folder for --dev, --quick)",
    )
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument(
        "--base-model", help="a trained base model folder (default: the cached one, trained first if missing)"
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        help=f"default: {' '.join(DEFAULT_VARIANTS)} (--quick: a few)",
    )
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
        "--dev",
        action="store_true",
        help="the dev seeds and loop seed 1: for choosing settings, never reported",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: 1 iteration, tiny budgets, {QUICK_SEEDS} seeds, variants {', '.join(QUICK_VARIANTS)}",
    )
    args = parser.parse_args(argv)
    variants = args.variants or (QUICK_VARIANTS if args.quick else DEFAULT_VARIANTS)
    try:
        check_variants(variants)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    protocol = PROTOCOL
    if args.quick:
        protocol = dataclasses.replace(
            PROTOCOL,
            final_seeds=PROTOCOL.final_seeds[:QUICK_SEEDS],
            dev_seeds=PROTOCOL.dev_seeds[:QUICK_SEEDS],
            best_of_n_groups=1,
        )
    work_dir = args.work_dir or REPO_ROOT / "runs" / ("proof-dev" if args.dev else "proof")
    out_dir = args.out_dir or (work_dir if args.dev or args.quick else REPO_ROOT / "docs")
    s = Settings(
        protocol=protocol,
        dev=args.dev,
        iterations=1 if args.quick else args.iterations,
        work_dir=work_dir,
        out_dir=out_dir,
        config=args.config,
        base_model=args.base_model,
        variants=variants,
        overrides=(QUICK if args.quick else []) + args.set,
        fresh=args.fresh,
        jobs=args.jobs,
        threads=args.threads,
    )
    prove(s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
