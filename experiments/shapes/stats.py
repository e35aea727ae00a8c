"""The proof's statistics: paired differences against the base, with intervals from a hierarchical bootstrap.

Every model draws the same (prompt, seed) images, so a model is compared with the base image by image. The
images are not independent draws, though: the images of one prompt share whatever makes that prompt easy or
hard, and the models of one loop seed share that loop's luck. A bootstrap over images alone treats 384 images
as 384 independent facts and gives an interval that is too narrow. This one resamples the levels the result
is meant to generalise over, outermost first:

1. loop seeds (when there are several): which runs of the loop;
2. prompts, with replacement: which target prompts;
3. image seeds within each resampled prompt, with replacement.

The statistic is the mean paired difference (in points): over loop seeds of the mean over prompts of the mean
over seeds. With one loop seed level 1 is skipped; with three it is coarse (ten distinct resamples) and so
wide, on purpose: two lucky runs of three must not make a result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

DRAWS = 2000
SEED = 0

Key = tuple[str, int]  # (prompt, image seed)
Rows = Mapping[Key, Mapping[str, bool]]


def _cube(rows_by_run: Sequence[Rows], base: Rows, metric: str) -> np.ndarray:
    """Paired differences in points as an array [run, prompt, seed] (every run must hold every base key)."""
    prompts = sorted({p for p, _ in base})
    seeds = sorted({s for _, s in base})
    if len(base) != len(prompts) * len(seeds):
        raise ValueError("the base rows are not a full prompt x seed grid")
    out = np.empty((len(rows_by_run), len(prompts), len(seeds)))
    for r, rows in enumerate(rows_by_run):
        missing = set(base) - set(rows)
        if missing:
            raise ValueError(f"run {r}: {len(missing)} of the base's images are missing, e.g. {min(missing)}")
        for i, p in enumerate(prompts):
            for j, s in enumerate(seeds):
                out[r, i, j] = 100.0 * (float(rows[(p, s)][metric]) - float(base[(p, s)][metric]))
    return out


def hierarchical_ci(diffs: np.ndarray, draws: int = DRAWS, seed: int = SEED) -> tuple[float, float]:
    """95% percentile interval of the mean of ``diffs`` [run, prompt, seed], resampling runs (if more than
    one), prompts, then seeds within each prompt."""
    rng = np.random.default_rng(seed)
    n_runs, n_prompts, n_seeds = diffs.shape
    means = np.empty(draws)
    for d in range(draws):
        runs = rng.integers(0, n_runs, n_runs) if n_runs > 1 else np.zeros(1, dtype=int)
        prompts = rng.integers(0, n_prompts, n_prompts)
        seeds = rng.integers(0, n_seeds, (n_prompts, n_seeds))
        picked = diffs[runs][:, prompts[:, None], seeds]  # [runs, prompts, seeds]
        means[d] = picked.mean()
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def versus(rows_by_run: Sequence[Rows], reference: Rows | Sequence[Rows], metric: str) -> dict:
    """``metric`` of one or several runs' models against ``reference`` (the base, or one reference model per
    run, paired run by run): value, reference value and delta in points, the hierarchical interval, images."""
    references = [reference] * len(rows_by_run) if isinstance(reference, Mapping) else list(reference)
    if len(references) != len(rows_by_run):
        raise ValueError(f"{len(rows_by_run)} runs against {len(references)} references")
    cubes = [
        _cube([{k: rows[k] for k in ref if k in rows}], ref, metric)[0]
        for rows, ref in zip(rows_by_run, references, strict=True)
    ]
    diffs = np.stack(cubes)
    values = [
        100.0 * np.mean([float(rows[k][metric]) for k in ref])
        for rows, ref in zip(rows_by_run, references, strict=True)
    ]
    ref_values = [100.0 * np.mean([float(m[metric]) for m in ref.values()]) for ref in references]
    lo, hi = hierarchical_ci(diffs)
    return {
        "value": round(float(np.mean(values)), 2),
        "reference_value": round(float(np.mean(ref_values)), 2),
        "delta": round(float(diffs.mean()), 2),
        "ci95": [round(lo, 2), round(hi, 2)],
        "images": int(diffs[0].size),
        "runs": len(rows_by_run),
    }


def subset(rows: Rows, prompts: set[str]) -> dict[Key, Mapping[str, bool]]:
    return {k: v for k, v in rows.items() if k[0] in prompts}
