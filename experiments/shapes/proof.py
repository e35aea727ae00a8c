"""``make proof``: does the CCSR loop improve a text-to-image model? Measured on the shapes world, by a
protocol fixed before the run (``experiments.shapes.protocol``).

The base model of the shapes world has two targeted weaknesses of different kinds (``base_model``): purple
circles are mis-captioned in its data, green circles are rare in it. The loop runs with a judge of chosen,
imperfect quality (``backends.NoisyJudge``), and every reported number comes from a second instrument that no
loop role uses (``evaluator``). Every final model (the gate's champion of each run, at its scale) draws the
protocol's prompts at fixed seeds; each image is graded and compared with the base's image of the same prompt
and seed; intervals come from a bootstrap over loop seeds, prompts and seeds (``stats``).

The variants: the base; best-of-10 (the loop's selection without training); ``ccsr``, the loop as configured,
at every loop seed of the protocol; ``control``, the same loop with random picks matched in number
(``control``), at every loop seed; the judge-quality sweep (``judge-perfect``, ``judge-0.25``); and
``ground-truth``, a LoRA trained on correct renders of the ccsr run's prompts (whether this model can learn
the weaknesses at all). More ablations run with ``--variants``.

Outputs, in ``--out-dir``: ``proof.json`` (the numbers), ``proof-results.md`` (tables generated from it),
``proof-grid.png`` and ``proof-rows/`` (every final model's per-image grades, gzip JSON lines: every number
can be recomputed). docs/proof.md is written by hand and never touched here.

    python -m experiments.shapes.proof --fresh --jobs 2   # make proof: from scratch, the reported run
    python -m experiments.shapes.proof --dev --jobs 2     # choosing settings: dev seeds, dev loop seeds
    python -m experiments.shapes.proof --final-seeds 9000 --loop-seeds 11 12 13   # a replication
    python -m experiments.shapes.proof --quick --base-model DIR --work-dir DIR    # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ccsr.config import Config
from ccsr.config_files import REPO_ROOT, load_config
from ccsr.records import PromptRecord, read_records
from ccsr.rundir import RunDir
from experiments.shapes import loop_measure, measure_final, proof_report, world
from experiments.shapes.base_model import cached_base_model
from experiments.shapes.protocol import (
    DEFAULT_VARIANTS,
    PROTOCOL,
    QUICK_VARIANTS,
    VARIANTS,
    Protocol,
    check_variants,
    needs,
    split,
    task,
    tasks,
)

logger = logging.getLogger(__name__)

CONFIG = REPO_ROOT / "configs" / "shapes.yaml"
QUICK = [
    "prompter.n_prompts=3",
    "prompter.n_validation=2",
    "generator.num_candidates=4",
    "generator.steps=4",
    "trainer.epochs=2",
    "trainer.max_steps=null",
    "trainer.batch_size=2",
    "filter.min_score=null",
    "evaluator.seeds=[0, 1]",
    "evaluator.scales=[0.0, 1.0]",
    "gate.bootstrap_draws=200",
]
QUICK_SEEDS = 2


@dataclass
class Settings:
    protocol: Protocol = PROTOCOL
    dev: bool = False  # the dev seeds and dev loop seeds (choosing settings), not the reported run
    iterations: int = 2
    work_dir: Path = REPO_ROOT / "runs" / "proof"
    out_dir: Path = REPO_ROOT / "docs"
    config: Path = CONFIG
    base_model: str | None = None  # a folder; default: base_model.cached_base_model() (trained once, cached)
    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS))
    overrides: list[str] = field(default_factory=list)  # for every run
    fresh: bool = False
    jobs: int = 1  # tasks run side by side in this many processes
    threads: int = 1  # torch CPU threads per process

    @property
    def seeds(self) -> range:
        return self.protocol.dev_seeds if self.dev else self.protocol.final_seeds

    @property
    def loop_seeds(self) -> tuple[int, ...]:
        return self.protocol.dev_loop_seeds if self.dev else self.protocol.loop_seeds

    def plan(self) -> list[tuple[str, list[int]]]:
        return self.protocol.plan(self.seeds)

    def final_dir(self, name: str) -> Path:
        return self.work_dir / "final" / name

    def run_dir(self, name: str) -> Path:
        return self.work_dir / "runs" / name


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


def loop_overrides(s: Settings, name: str) -> list[str]:
    variant, seed = split(name)
    out = common_overrides(s) + VARIANTS[variant][2]
    out.append(f"prompter.validation_file={s.work_dir / f'gate-prompts-{s.protocol.class_name}.txt'}")
    return out + [f"seed={seed}"]


def run_loop(s: Settings, name: str) -> Path:
    """``ccsr run`` of a loop task (``variant@loop_seed``) into its run folder."""
    from ccsr.cli import main as ccsr_main

    run_dir = s.run_dir(name)
    argv = ["run", "--config", str(s.config), "--class", s.protocol.class_name, "--run-dir", str(run_dir)]
    argv += ["--iterations", str(s.iterations)]
    for o in loop_overrides(s, name):
        argv += ["--set", o]
    logger.info("%s: ccsr %s", name, " ".join(argv))
    code = ccsr_main(argv)
    if code != 0:
        raise RuntimeError(f"{name}: ccsr run exited with {code} (see {run_dir}/log.txt)")
    return run_dir


def run_matched_control(s: Settings, name: str) -> Path:
    """The matched control of the ccsr run of the same loop seed (``experiments.shapes.control``)."""
    from ccsr.inputs import check_config, set_offline
    from experiments.shapes.control import run_control

    _, seed = split(name)
    cfg = load_config(s.config, loop_overrides(s, name), class_name=s.protocol.class_name)
    check_config(cfg)
    set_offline(cfg)
    cfg.iterations = s.iterations
    run_control(cfg, s.run_dir(name), s.run_dir(task("ccsr", seed)), s.iterations)
    return s.run_dir(name)


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
    """One LoRA on correct renders of the first ccsr run's prompts, with that run's config and its total
    steps (the config's own budget when it trained nothing). Objective sft: correct renders have no losers."""
    from ccsr.train import train_lora

    run = RunDir(s.run_dir(task("ccsr", s.loop_seeds[0])))
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
# one task's work (in a worker process with --jobs > 1)


def _timed(seconds: dict[str, float], stage: str, work, *args, **kwargs):
    start = time.perf_counter()
    out = work(*args, **kwargs)
    seconds[stage] = round(time.perf_counter() - start, 1)
    return out


def final_model(
    s: Settings, name: str, seconds: dict[str, float]
) -> tuple[Config | None, Path | None, float, dict]:
    """Task ``name``'s loop or training, if it has one, then what its final model is: the config to draw with
    (None: the base, whose rows are reused), the LoRA and its scale, and what to record about it."""
    from ccsr.gate import current_champion

    kind = VARIANTS[split(name)[0]][1]
    if kind == "measure":
        cfg = load_config(s.config, common_overrides(s), class_name=s.protocol.class_name)
        return cfg, None, 0.0, {"model": "the base model"}
    if kind == "ground-truth":
        cfg, lora, info = _timed(seconds, "train", train_ground_truth, s)
        model = f"LoRA at scale 1 ({info['steps']} steps on {info['images']} renders)"
        return cfg, lora, 1.0, {"model": model, "ground_truth": info}
    runner = run_matched_control if kind == "control" else run_loop
    run = RunDir(_timed(seconds, "loop", runner, s, name))
    record = {"loop": _timed(seconds, "loop measured", loop_measure.measure_run, run.root)}
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
    """One task, start to end: its final model drawn and graded into ``final/<name>``. Returns what
    ``final_model`` records, ``rows`` (None: the final model is the base) and ``seconds``."""
    folder = s.final_dir(name)
    shutil.rmtree(folder, ignore_errors=True)  # images of another seed set must not linger
    seconds: dict[str, float] = {}
    if name == "best-of-10":
        cfg = load_config(s.config, common_overrides(s), class_name=s.protocol.class_name)
        p = s.protocol
        plan = [(prompt, seeds[: p.best_of_n_seeds]) for prompt, seeds in s.plan()[: len(p.target_prompts())]]
        start = time.perf_counter()
        rows, info = measure_final.best_of_n(cfg, plan, p.best_of_n, s.final_dir("base"), folder)
        out = {"model": f"best of {p.best_of_n} base images", "best_of_n": info, "rows": rows}
    else:
        cfg, lora, scale, out = final_model(s, name, seconds)
        start = time.perf_counter()
        out["rows"] = (
            None if cfg is None else measure_final.draw_and_measure(cfg, s.plan(), folder, lora, scale, name)
        )
    seconds["final images"] = round(time.perf_counter() - start, 1)
    return out | {"seconds": seconds}


def _init_worker(threads: int) -> None:
    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(threads)


def schedule(names: list[str], loop_seeds: tuple[int, ...]) -> list[str]:
    """The order tasks start in: the loops first (the longest work), then the measurements, then the tasks
    that read another's results (``protocol.needs``)."""
    kinds = {n: VARIANTS[split(n)[0]][1] for n in names}
    loops = [n for n in names if kinds[n] == "loop"]
    waiting = [n for n in names if needs(n, loop_seeds) is not None]
    return loops + [n for n in names if n not in loops and n not in waiting] + waiting


def run_tasks(s: Settings, names: list[str]) -> dict[str, dict]:
    """``run_task`` of every name, ``s.jobs`` side by side, each as soon as what it needs is done."""
    order = schedule(names, s.loop_seeds)
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
            ready = [n for n in order if needs(n, s.loop_seeds) not in {*order, *running.values()}]
            while ready and len(running) < s.jobs:
                name = ready.pop(0)
                order.remove(name)
                running[pool.submit(run_task, s, name)] = name
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                done[running.pop(future)] = future.result()
    return done


def prove(s: Settings) -> dict:
    """The whole proof: base model, loops and variants, final grading, proof.json and its views."""
    check_variants(s.variants)
    s = dataclasses.replace(s, variants=[n for n in VARIANTS if n == "base" or n in s.variants])
    started = time.perf_counter()
    if s.fresh and s.work_dir.exists():
        shutil.rmtree(s.work_dir)
    s.work_dir.mkdir(parents=True, exist_ok=True)
    # Config first: a bad setting fails in a second, not after the base model's training.
    load_config(s.config, s.overrides, class_name=s.protocol.class_name)
    seconds: dict[str, float] = {}
    base_path = _timed(seconds, "base model (build or cache)", build_base, s)
    s = dataclasses.replace(s, base_model=str(base_path))
    (s.work_dir / f"gate-prompts-{s.protocol.class_name}.txt").write_text(
        "\n".join(s.protocol.gate_prompts()) + "\n", encoding="utf-8"
    )
    names = tasks(s.variants, s.loop_seeds)
    done = _timed(seconds, f"tasks, wall clock ({s.jobs} side by side)", run_tasks, s, names)
    results = proof_report.write_all(s, done, seconds, started)
    logger.info("proof written to %s (%.1f min)", s.out_dir, results["minutes"])
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.shapes.proof", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--iterations", type=int, default=Settings.iterations)
    parser.add_argument("--work-dir", type=Path, help="default runs/proof (runs/proof-dev with --dev)")
    parser.add_argument(
        "--out-dir", type=Path, help="proof.json and its views (default docs/; the work folder otherwise)"
    )
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument(
        "--base-model", help="a trained base model folder (default: the cached one, trained first if missing)"
    )
    parser.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), help=f"default: {' '.join(DEFAULT_VARIANTS)}"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run"
    )
    parser.add_argument(
        "--final-seeds",
        type=int,
        metavar="START",
        help=f"image seeds START.. instead of the protocol's (a replication; {len(PROTOCOL.final_seeds)} seeds)",
    )
    parser.add_argument("--loop-seeds", type=int, nargs="+", help="loop seeds instead of the protocol's")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (results depend on it)")
    parser.add_argument("--jobs", type=int, default=1, help="tasks side by side in this many processes")
    parser.add_argument("--fresh", action="store_true", help="delete the work folder, retrain the base model")
    parser.add_argument(
        "--dev",
        action="store_true",
        help="the dev seeds and dev loop seeds: for choosing settings, never reported",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: 1 iteration, tiny budgets, {QUICK_SEEDS} seeds, one loop seed, a few variants",
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
    if args.final_seeds is not None:
        n = len(PROTOCOL.final_seeds)
        protocol = dataclasses.replace(protocol, final_seeds=range(args.final_seeds, args.final_seeds + n))
    if args.loop_seeds:
        key = "dev_loop_seeds" if args.dev else "loop_seeds"
        protocol = dataclasses.replace(protocol, **{key: tuple(args.loop_seeds)})
    if args.quick:
        protocol = dataclasses.replace(
            protocol,
            final_seeds=protocol.final_seeds[:QUICK_SEEDS],
            dev_seeds=protocol.dev_seeds[:QUICK_SEEDS],
            guard_seeds=1,
            best_of_n_seeds=1,
            loop_seeds=protocol.loop_seeds[:1],
            dev_loop_seeds=protocol.dev_loop_seeds[:1],
        )
    work_dir = args.work_dir or REPO_ROOT / "runs" / ("proof-dev" if args.dev else "proof")
    reported = not (args.dev or args.quick or args.final_seeds is not None or args.loop_seeds)
    out_dir = args.out_dir or (REPO_ROOT / "docs" if reported else work_dir)
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
