"""The improvement gate and the champion history (``champion.json``).

Iteration k's LoRA becomes the champion (what iteration k+1 draws its candidates with and trains from) only
if its gate metric, at its best non-zero LoRA scale, beats the current champion's by more than
``gate.margin``. The base model's win-rate against itself is 0 (every pair a tie); for the other metrics the
base's value is read at scale 0 of the same evaluation. ``gate.enabled: false`` accepts every evaluated LoRA.

``gate.rule: paired_bootstrap`` asks more than a higher mean: the candidate scale is chosen as above, then its
per-image metric is paired with the champion's by (held-out prompt id, evaluator seed), and the LoRA is
accepted only if the two-sided ``gate.confidence`` interval of the mean paired gain, from a bootstrap over
the held-out prompts, lies above ``gate.margin``. A small mean gain that is noise across prompts is rejected.
``gate.resample: prompts`` (the default) resamples whole prompts, each with all its images: a prompt's seed
noise is already in the spread of the prompt means, so this is the interval of a clustered sample; with one
prompt only its seeds are resampled. ``prompts_and_seeds`` resamples the seeds within each drawn prompt as
well, which counts the seed noise a second time: wider, conservative. Choosing the best of several scales first and testing only that one is
optimistic (the interval does not pay for the choice); the entry records how many scales were looked at.
Keys that do not match (the held-out prompts or ``evaluator.seeds`` changed, a champion's records lost) are a
rejection with the counts in the reason: the champion stays, the run goes on, the entry says why.

``champion.json``: ``{"champion": {iteration, scale, metric[, lora]}, "history": [entry per iteration]}``;
written only here (atomically), read by status and report as plain JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ccsr.records import EvalRecord, read_records
from ccsr.rundir import RunDir, RunDirError, atomic_write_json, read_json
from ccsr.seeds import derive_seed

if TYPE_CHECKING:
    from ccsr.config import Config, GateConfig


class GateError(ValueError):
    """The evaluation summary lacks the gate metric (config validation should have refused the config)."""


@dataclass(frozen=True)
class Champion:
    """The newest LoRA the gate accepted (``iteration``), or the base model (``iteration`` None)."""

    iteration: int | None = None
    scale: float = 0.0
    metric: float | None = None

    def lora_dir(self, run: RunDir) -> Path | None:
        return None if self.iteration is None else run.lora_dir(self.iteration)


def history(run: RunDir) -> list[dict[str, Any]]:
    return (read_json(run.champion_path, default={}) or {}).get("history", [])


def champion_before(run: RunDir, k: int) -> Champion:
    """The champion when iteration ``k`` starts: the newest LoRA accepted by an earlier iteration."""
    accepted = [h for h in history(run) if h["accepted"] and h["iteration"] < k]
    if not accepted:
        return Champion()
    top = accepted[-1]
    return Champion(top["iteration"], top["scale"], top["metric"])


def champion_lora(run: RunDir, k: int) -> Path | None:
    """The LoRA iteration k draws its candidates with and starts training from (None: the base model)."""
    return champion_before(run, k).lora_dir(run)


def generation_scale(run: RunDir, k: int, configured: float | None) -> float:
    """The scale of ``champion_lora(run, k)`` when it draws iteration k's candidates: ``configured``
    (``generator.generation_scale``), or with None the scale the gate accepted the champion at."""
    return champion_before(run, k).scale if configured is None else configured


def current_champion(run: RunDir) -> tuple[Path | None, float]:
    """The run's champion LoRA folder and scale as recorded in champion.json ((None, 0.0): the base model)."""
    champion = (read_json(run.champion_path, default={}) or {}).get("champion") or {}
    if champion.get("iteration") is None:
        return None, 0.0
    lora = run.root / champion["lora"]
    if not lora.resolve().is_relative_to(run.root.resolve()):
        raise RunDirError(
            f"{run.champion_path}: the champion LoRA {champion['lora']!r} is outside the run directory; "
            "a run's champion is one of its own iterations' LoRAs (give --lora to draw with another)"
        )
    return lora, float(champion["scale"])


# (held-out prompt id, evaluator seed): one evaluation image at one scale
ImageKey = tuple[str, int]


@dataclass(frozen=True)
class PairedImages:
    """What ``rule: paired_bootstrap`` tests, read from the run by the caller so that ``decide`` stays pure.

    ``by_scale``: iteration k's evaluation, scale -> image key -> the gate metric of that image (detection as
    0/1; scale 0 the base model). ``champion``: the champion's images (its own iteration's evaluation at its
    scale); None when the champion is the base model, read at scale 0 of ``by_scale``. ``seed``: the
    bootstrap's, derived from the config seed and k, so a redone gate decides identically.
    """

    by_scale: dict[float, dict[ImageKey, float]]
    champion: dict[ImageKey, float] | None
    seed: int


# The record field each per-image gate metric is read from (``gate.rule: paired_bootstrap``).
_PER_IMAGE_FIELDS = {"clip_score": "clip_score", "judge_score": "judge_score", "detection_rate": "detected"}


def per_image(run: RunDir, k: int, metric: str) -> dict[float, dict[ImageKey, float]]:
    """Iteration k's evaluation images as the paired gate reads them: scale -> (prompt id, seed) -> the
    image's ``metric`` (``gate.metric``; detection as 0/1). An image without the measure is left out, so
    it fails to pair rather than counting as 0; no records (none written, or lost): an empty mapping."""
    field = _PER_IMAGE_FIELDS[metric]
    out: dict[float, dict[tuple[str, int], float]] = {}
    for r in read_records(run.eval_dir(k) / "records.jsonl", EvalRecord):
        value = getattr(r, field)
        if value is not None:
            out.setdefault(float(r.scale), {})[(r.prompt_id, r.seed)] = float(value)
    return out


def paired_images(cfg: Config, run: RunDir, k: int) -> PairedImages | None:
    """What ``gate.rule: paired_bootstrap`` tests (None under ``mean``), read from the run: iteration k's
    per-image gate metric at every scale and the champion's at its scale, from the champion iteration's own
    evaluation (None for the base model: scale 0 of k's). The bootstrap seed follows from the config seed and
    k, so a gate redone after a crash draws the same resamples."""
    g = cfg.gate
    if g.rule != "paired_bootstrap":
        return None
    champion = champion_before(run, k)
    theirs = None
    if champion.iteration is not None:
        theirs = per_image(run, champion.iteration, g.metric).get(float(champion.scale), {})
    return PairedImages(per_image(run, k, g.metric), theirs, derive_seed(cfg.seed, "gate", k))


def _metric(values: dict[str, Any], metric: str, scale: str) -> float:
    value = values.get(metric)
    if value is None:
        raise GateError(
            f"the evaluation has no {metric!r} at scale {scale}; gate.metric must be one the evaluation "
            "computes (judge_score and detection_rate need evaluator.judge_and_detect: true)"
        )
    return value


def decide(
    gate: GateConfig,
    k: int,
    summary: dict | None,
    champion: Champion,
    reason: str,
    images: PairedImages | None = None,
) -> dict:
    """Iteration k's history entry: accepted or not, with the metric, scale and the reason. Pure.

    ``summary`` is the evaluation summary (``by_scale``: metric values per scale, "0" the base); None when
    nothing was evaluated, then the entry is a rejection for ``reason``. ``images``: the per-image values
    ``rule: paired_bootstrap`` needs (unused by ``rule: mean``).
    """
    entry = {"iteration": k, "accepted": False, "metric_name": gate.metric, "metric": None, "scale": None}
    if summary is None:
        entry["reason"] = reason
        return entry
    by_scale = summary["by_scale"]
    scored = {float(s): _metric(v, gate.metric, s) for s, v in by_scale.items() if float(s) > 0}
    if not scored:  # evaluator.scales: [0] evaluates the base model only; nothing to accept
        entry["reason"] = "no LoRA scale above 0 evaluated"
        return entry
    best = max(scored, key=lambda s: (scored[s], -s))
    entry["metric"], entry["scale"] = scored[best], best
    if champion.iteration is None:
        reference = 0.0 if gate.metric == "win_rate" else _metric(by_scale["0"], gate.metric, "0")
    else:
        reference = champion.metric
    entry["champion_metric"] = reference
    if not gate.enabled:
        entry["accepted"], entry["reason"] = True, "gate disabled"
    elif gate.rule == "paired_bootstrap":
        entry.update(_paired_test(gate, best, len(scored), images))
    elif scored[best] > reference + gate.margin:
        entry["accepted"] = True
        entry["reason"] = f"{gate.metric} {scored[best]:.4f} > {reference:.4f} + margin {gate.margin:g}"
    else:
        entry["reason"] = f"{gate.metric} {scored[best]:.4f} <= {reference:.4f} + margin {gate.margin:g}"
    return entry


def _paired_test(gate: GateConfig, scale: float, n_scales: int, images: PairedImages | None) -> dict:
    """``rule: paired_bootstrap``: the fields it adds to the entry (accepted, reason and the statistics)."""
    if images is None:
        raise GateError("gate.rule paired_bootstrap needs the per-image values of the evaluation (images)")
    candidate = images.by_scale.get(scale, {})
    reference = images.by_scale.get(0.0, {}) if images.champion is None else images.champion
    out: dict[str, Any] = {"rule": gate.rule, "scales_considered": n_scales}
    missing = len(candidate.keys() - reference.keys())  # candidate images without a champion image
    extra = len(reference.keys() - candidate.keys())  # champion images without a candidate image
    if missing or extra or not candidate:
        out["reason"] = (
            f"paired_bootstrap: the images do not pair by (prompt, seed): {missing} of the {len(candidate)} "
            f"at scale {scale:g} have no champion image, {extra} of the champion's {len(reference)} have "
            "no image here (held-out prompts or evaluator.seeds changed?); the champion stays"
        )
        out["unpaired"] = {"candidate": missing, "champion": extra}
        return out
    keys = sorted(candidate)
    differences = {key: candidate[key] - reference[key] for key in keys}
    mean, low, high = paired_interval(
        differences, gate.bootstrap_draws, gate.confidence, images.seed, seeds_too=gate.resample != "prompts"
    )
    out |= {
        "mean_difference": round(mean, 6),
        "interval": [round(low, 6), round(high, 6)],
        "confidence": gate.confidence,
        "resample": gate.resample,
        "prompts": len({prompt for prompt, _ in keys}),
        "images": len(keys),
        "bootstrap_draws": gate.bootstrap_draws,
        "bootstrap_seed": images.seed,
    }
    figures = (
        f"{gate.metric} gain {mean:+.4f}, {gate.confidence * 100:.4g}% interval [{low:+.4f}, {high:+.4f}] over "
        f"{out['images']} paired images of {out['prompts']} prompts at scale {scale:g} (best of {n_scales})"
    )
    out["accepted"] = low > gate.margin
    out["reason"] = f"{figures}: lower end {'>' if out['accepted'] else '<='} margin {gate.margin:g}"
    return out


def paired_interval(
    differences: dict[ImageKey, float], draws: int, confidence: float, seed: int, seeds_too: bool = False
) -> tuple[float, float, float]:
    """(mean, low, high): the mean paired difference and its two-sided ``confidence`` percentile interval.

    Images of one prompt are not independent (their seeds share the prompt), so each draw resamples the
    prompts with replacement, every drawn prompt with all its images, and takes the mean over the drawn
    images. ``seeds_too`` resamples each drawn prompt's seeds with replacement as well (a two-stage
    bootstrap, wider). With a single prompt its seeds are resampled. The draws follow from ``seed`` alone and
    the keys are sorted, so the same inputs give the same interval.
    """
    import numpy as np

    rows: dict[str, list[float]] = {}
    for (prompt, _), value in sorted(differences.items()):
        rows.setdefault(prompt, []).append(value)
    counts = np.array([len(r) for r in rows.values()])
    # One row per prompt, padded to the most seeds any prompt has (all of them, when every key pairs).
    table = np.zeros((len(rows), counts.max()))
    for i, row in enumerate(rows.values()):
        table[i, : len(row)] = row
    rng = np.random.default_rng(seed)
    prompts = rng.integers(0, len(rows), size=(draws, len(rows)))  # each draw: which prompts
    n = counts[prompts][..., None]  # the seed count of each drawn prompt
    if seeds_too or len(rows) == 1:
        seeds = (rng.random((draws, len(rows), table.shape[1])) * n).astype(int)  # with replacement
    else:
        seeds = np.broadcast_to(np.arange(table.shape[1]), (draws, len(rows), table.shape[1]))  # all of them
    used = np.arange(table.shape[1]) < n  # a prompt with fewer seeds draws only as many
    drawn = table[prompts[..., None], seeds] * used
    means = drawn.sum(axis=(1, 2)) / used.sum(axis=(1, 2))
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    mean = sum(differences.values()) / len(differences)
    return float(mean), float(low), float(high)


def record(run: RunDir, entry: dict) -> None:
    """Put ``entry`` into the history (replacing an earlier one of its iteration: a redo is idempotent) and
    commit champion.json with the newest accepted LoRA as the champion."""
    entries = [h for h in history(run) if h["iteration"] != entry["iteration"]]
    entries.append(entry)
    entries.sort(key=lambda h: h["iteration"])
    accepted = [h for h in entries if h["accepted"]]
    if accepted:
        top = accepted[-1]
        champion = {"iteration": top["iteration"], "scale": top["scale"], "metric": top["metric"]}
        champion["lora"] = str(run.lora_dir(top["iteration"]).relative_to(run.root))
    else:
        champion = {"iteration": None, "scale": 0.0, "metric": None}
    atomic_write_json(run.champion_path, {"champion": champion, "history": entries})


def gate_iteration(
    gate: GateConfig,
    run: RunDir,
    k: int,
    summary: dict | None,
    reason: str = "no LoRA this iteration",
    images: PairedImages | None = None,
) -> dict:
    """Decide on iteration k's LoRA against the champion before k, record it, emit the "gate" event."""
    entry = decide(gate, k, summary, champion_before(run, k), reason, images)
    record(run, entry)
    run.event("gate", **entry)
    return {key: entry[key] for key in ("accepted", "reason", "metric", "scale")}
