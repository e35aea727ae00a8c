"""Evaluation plots for the report: metrics against the LoRA scale, and the loop's progress across iterations.

matplotlib's object API with the Agg canvas only (no pyplot global state, no display, no font download: the
DejaVu fonts ship with matplotlib). Files are written atomically so a report being rebuilt never shows a torn PNG.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from ccsr.rundir import atomic_write_bytes

# (key in eval.json by_scale[s], axis title); the optional ones are drawn only when some scale carries them.
SCALE_METRICS: tuple[tuple[str, str], ...] = (
    ("clip_score", "CLIP score"),
    ("win_rate", "win-rate vs base"),
    ("judge_score", "judge score"),
    ("detection_rate", "detection rate"),
)


def as_number(value: Any) -> float | None:
    """A float, or None for anything missing, NaN or not a number (records and eval.json are data)."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def _figure(n_panels: int, title: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(n_panels, 2)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(5.0 * cols, 3.4 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for extra in axes[n_panels:]:
        extra.set_visible(False)
    fig.suptitle(title, parse_math=False)  # a class name such as "$x^$" is text, not TeX
    return fig, axes[:n_panels]


def _save(fig, out_png: Path) -> Path:
    buf = io.BytesIO()
    # No timestamp in the PNG metadata: the same eval.json gives the same bytes.
    fig.savefig(buf, format="png", metadata={"Software": None})
    atomic_write_bytes(Path(out_png), buf.getvalue())
    return Path(out_png)


def _scale_rows(eval_json: dict) -> list[tuple[float, dict]]:
    rows = []
    for key, row in (eval_json.get("by_scale") or {}).items():
        scale = as_number(key)
        if scale is not None and isinstance(row, dict):
            rows.append((scale, row))
    return sorted(rows, key=lambda r: r[0])


def plot_eval_by_scale(eval_json: dict, out_png: Path, title: str | None = None) -> Path:
    """One subplot per metric of ``eval_json['by_scale']`` against the LoRA scale (scale 0 is the base model).

    CLIP score and win-rate always; judge score and detection rate when the evaluation recorded them. The
    win-rate panel also shows wins+ties (the paper reports both), and the chosen ``best_scale`` is marked.
    """
    rows = _scale_rows(eval_json)
    metrics = [
        (key, label)
        for key, label in SCALE_METRICS
        if key in ("clip_score", "win_rate") or any(as_number(r.get(key)) is not None for _, r in rows)
    ]
    fig, axes = _figure(len(metrics), title or "evaluation by LoRA scale")
    best = as_number(eval_json.get("best_scale"))
    scales = [s for s, _ in rows]
    for ax, (key, label) in zip(axes, metrics, strict=True):
        points = [(s, as_number(r.get(key))) for s, r in rows]
        points = [(s, v) for s, v in points if v is not None]
        if points:
            ax.plot([s for s, _ in points], [v for _, v in points], marker="o", label=label)
        if key == "win_rate":
            ties = [(s, as_number(r.get("win_tie_rate"))) for s, r in rows]
            ties = [(s, v) for s, v in ties if v is not None]
            if ties:
                ax.plot(
                    [s for s, _ in ties], [v for _, v in ties], marker="s", linestyle="--", label="wins+ties"
                )
            ax.set_ylim(-0.05, 1.05)
            ax.legend(loc="best", fontsize="small")
        if key == "detection_rate":
            ax.set_ylim(-0.05, 1.05)
        if best is not None:
            ax.axvline(best, color="grey", linestyle=":", linewidth=1)
        if not points:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        if scales:  # same x range on every panel, even one that has a single point
            ax.set_xlim(min(scales) - 0.05, max(scales) + 0.05)
        ax.set_title(label)
        ax.set_xlabel("LoRA scale")
        ax.grid(True, alpha=0.3)
    return _save(fig, out_png)


def plot_across_iterations(evals: list[tuple[int, dict]], out_png: Path, title: str | None = None) -> Path:
    """The loop's progress: per evaluated iteration, the win-rate at its best scale and the CLIP score of the
    base (scale 0) next to the best scale; judge score / detection rate at the best scale when recorded."""
    evals = sorted(evals, key=lambda e: e[0])

    def at_best(ev: dict, key: str) -> float | None:
        best = as_number(ev.get("best_scale"))
        for scale, row in _scale_rows(ev):
            if best is not None and math.isclose(scale, best):
                return as_number(row.get(key))
        return None

    def at_base(ev: dict, key: str) -> float | None:
        for scale, row in _scale_rows(ev):
            if scale == 0.0:
                return as_number(row.get(key))
        return None

    panels: list[tuple[str, list[tuple[str, str, Any]]]] = [
        (
            "win-rate vs base (best scale)",
            [
                ("win-rate", "o-", lambda ev: as_number(ev.get("win_rate"))),
                ("wins+ties", "s--", lambda ev: as_number(ev.get("win_tie_rate"))),
            ],
        ),
        (
            "CLIP score",
            [
                ("base (scale 0)", "o--", lambda ev: at_base(ev, "clip_score")),
                ("best scale", "o-", lambda ev: at_best(ev, "clip_score")),
            ],
        ),
    ]
    for key, label in SCALE_METRICS[2:]:
        if any(at_best(ev, key) is not None for _, ev in evals):
            panels.append(
                (
                    label,
                    [
                        ("base (scale 0)", "o--", lambda ev, key=key: at_base(ev, key)),
                        ("best scale", "o-", lambda ev, key=key: at_best(ev, key)),
                    ],
                )
            )
    fig, axes = _figure(len(panels), title or "across iterations")
    for ax, (label, series) in zip(axes, panels, strict=True):
        drawn = False
        for name, style, value in series:
            points = [(k, value(ev)) for k, ev in evals]
            points = [(k, v) for k, v in points if v is not None]
            if points:
                ax.plot([k for k, _ in points], [v for _, v in points], style, label=name)
                drawn = True
        if drawn:
            ax.legend(loc="best", fontsize="small")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        if "rate" in label:
            ax.set_ylim(-0.05, 1.05)
        if evals:
            ax.set_xlim(evals[0][0] - 0.25, evals[-1][0] + 0.25)
            if len(evals) <= 20:
                ax.set_xticks([k for k, _ in evals])
        ax.set_title(label)
        ax.set_xlabel("iteration")
        ax.grid(True, alpha=0.3)
    return _save(fig, out_png)
