"""``make bench``: side-by-side measurements on the tiny models, printed and written to runs/bench/results.json.

Benchmarks, not tests: these machines are noisy, so figures are ratios measured in one run.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from benchmarks.judge import bench_judge
from benchmarks.train import bench_train
from ccsr.rundir import atomic_write_json, read_json

RESULTS = Path("runs/bench/results.json")


def bench_iteration() -> dict:
    """Wall time of each stage of one tiny iteration, and the share spent outside model calls."""
    from benchmarks.common import fresh_loop
    from ccsr.config_files import REPO_ROOT, load_config
    from ccsr.models import build_embedded

    cfg = load_config(REPO_ROOT / "configs" / "tiny.yaml", class_name="giraffe")
    cfg.iterations = 1
    build_embedded(cfg)  # build once, outside the timed run
    loop = fresh_loop(cfg, Path("runs/bench/iteration"))
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


BENCHMARKS = {"iteration": bench_iteration, "judge": bench_judge, "train": bench_train}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    names = (argv if argv is not None else sys.argv[1:]) or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark {unknown[0]!r} (known: {', '.join(BENCHMARKS)})", file=sys.stderr)
        return 2
    results = read_json(RESULTS, default={}) or {}
    for name in names:
        print(f"== {name}", flush=True)
        result = BENCHMARKS[name]()
        results[name] = result
        print(json.dumps(result, indent=2))
        atomic_write_json(RESULTS, results)
    print(f"results: {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
