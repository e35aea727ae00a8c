"""``make bench``: side-by-side measurements on the tiny models, printed and written to runs/bench/results.json.

Benchmarks, not tests: these machines are noisy, so figures are ratios measured in one run.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from pathlib import Path

from ccsr.rundir import atomic_write_json, read_json

RESULTS = Path("runs/bench/results.json")


def bench_iteration() -> dict:
    """Wall time of each stage of one tiny iteration, and the share spent outside model calls."""
    from ccsr.config import REPO_ROOT, load_config
    from ccsr.loop import Loop
    from ccsr.models import is_embedded, resolve_model
    from ccsr.rundir import RunDir

    cfg = load_config(REPO_ROOT / "configs" / "tiny.yaml", class_name="giraffe")
    cfg.iterations = 1
    for section in ("prompter", "generator", "judge", "detector", "evaluator"):
        name = getattr(cfg, section).model
        if is_embedded(name):
            resolve_model(name, cfg.model_cache)  # build once, outside the timed run
    resolve_model(cfg.detector.text_model, cfg.model_cache)
    root = Path("runs/bench/iteration")
    if root.exists():
        shutil.rmtree(root)
    run = RunDir(root)
    run.root.mkdir(parents=True)
    from ccsr.config import save_config

    save_config(cfg, run.config_path)
    loop = Loop(cfg, run)
    start = time.perf_counter()
    loop.run_iterations(1)
    total = time.perf_counter() - start
    stages = {k: round(v, 3) for k, v in loop.stage_seconds.items()}
    model = sum(loop.model_seconds.values())
    staged = sum(loop.stage_seconds.values())
    return {
        "stage_seconds": stages,
        "model_seconds": {k: round(v, 3) for k, v in loop.model_seconds.items()},
        "total_seconds": round(total, 3),
        "overhead_share": round(max(staged - model, 0.0) / staged, 4) if staged else 0.0,
    }


BENCHMARKS = {
    "iteration": "ccsr.bench:bench_iteration",
    "judge": "ccsr.bench_judge:bench_judge",
    "train": "benchmarks.train:bench_train",
}


def main(argv: list[str] | None = None) -> int:
    import importlib

    logging.basicConfig(level=logging.WARNING)
    names = (argv if argv is not None else sys.argv[1:]) or list(BENCHMARKS)
    results = read_json(RESULTS, default={}) or {}
    for name in names:
        module, func = BENCHMARKS[name].split(":")
        try:
            fn = getattr(importlib.import_module(module), func)
        except (ImportError, AttributeError) as exc:
            print(f"{name}: not available ({exc})")
            continue
        print(f"== {name}", flush=True)
        result = fn()
        results[name] = result
        print(json.dumps(result, indent=2))
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(RESULTS, results)
    print(f"results: {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
