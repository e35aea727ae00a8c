"""The improvement gate and the champion history (``champion.json``).

Iteration k's LoRA becomes the champion (what iteration k+1 draws its candidates with and trains from) only
if its gate metric, at its best non-zero LoRA scale, beats the current champion's by more than
``gate.margin``. The base model's win-rate against itself is 0 (every pair a tie); for the other metrics the
base's value is read at scale 0 of the same evaluation. ``gate.enabled: false`` accepts every evaluated LoRA.

``champion.json``: ``{"champion": {iteration, scale, metric[, lora]}, "history": [entry per iteration]}``;
written only here (atomically), read by status and report as plain JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ccsr.rundir import RunDir, atomic_write_json, read_json

if TYPE_CHECKING:
    from ccsr.config import GateConfig


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
    return run.root / champion["lora"], float(champion["scale"])


def _metric(values: dict[str, Any], metric: str, scale: str) -> float:
    value = values.get(metric)
    if value is None:
        raise GateError(
            f"the evaluation has no {metric!r} at scale {scale}; gate.metric must be one the evaluation "
            "computes (judge_score and detection_rate need evaluator.judge_and_detect: true)"
        )
    return value


def decide(gate: GateConfig, k: int, summary: dict | None, champion: Champion, reason: str) -> dict:
    """Iteration k's history entry: accepted or not, with the metric, scale and the reason. Pure.

    ``summary`` is the evaluation summary (``by_scale``: metric values per scale, "0" the base); None when
    nothing was evaluated, then the entry is a rejection for ``reason``.
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
    elif scored[best] > reference + gate.margin:
        entry["accepted"] = True
        entry["reason"] = f"{gate.metric} {scored[best]:.4f} > {reference:.4f} + margin {gate.margin:g}"
    else:
        entry["reason"] = f"{gate.metric} {scored[best]:.4f} <= {reference:.4f} + margin {gate.margin:g}"
    return entry


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
    gate: GateConfig, run: RunDir, k: int, summary: dict | None, reason: str = "no LoRA this iteration"
) -> dict:
    """Decide on iteration k's LoRA against the champion before k, record it, emit the "gate" event."""
    entry = decide(gate, k, summary, champion_before(run, k), reason)
    record(run, entry)
    run.event("gate", **entry)
    return {key: entry[key] for key in ("accepted", "reason", "metric", "scale")}
