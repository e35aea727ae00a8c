"""Evaluator: CLIP score of held-out prompts at several LoRA scales, win/tie/loss against the base.

Paper section 4: CLIP score curves from LoRA scale 0 (the base model) to 1, and wins+ties against the base
per (prompt, seed) where a difference under 0.01 is a tie.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

    from ccsr.config import Config


class CLIPScorer:
    """CLIP score = 100 * max(cos(image, text), 0) with a transformers ``CLIPModel``."""

    def __init__(self, cfg: Config):
        import torch
        from transformers import CLIPModel, CLIPProcessor

        from ccsr.devices import torch_device
        from ccsr.models import resolve_model

        path = resolve_model(cfg.evaluator.model, cfg.model_cache)
        self.device = torch_device(cfg)
        self.model = CLIPModel.from_pretrained(path).to(self.device).eval()
        self.processor = CLIPProcessor.from_pretrained(path)
        self._torch = torch

    @staticmethod
    def _embedding(out):
        # transformers 5 returns an output object whose pooler_output is the projected embedding.
        return out if hasattr(out, "norm") else out.pooler_output

    def clip_scores(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        torch = self._torch
        inputs = self.processor(
            text=prompts, images=images, return_tensors="pt", padding=True, truncation=True, max_length=77
        ).to(self.device)
        with torch.inference_mode():
            img = self._embedding(self.model.get_image_features(pixel_values=inputs["pixel_values"]))
            txt = self._embedding(
                self.model.get_text_features(
                    input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
                )
            )
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        cos = (img * txt).sum(-1)
        return [round(float(100.0 * max(c, 0.0)), 6) for c in cos.tolist()]

    def close(self) -> None:
        del self.model


@dataclass
class WinTieLoss:
    wins: int
    ties: int
    losses: int

    @property
    def total(self) -> int:
        return self.wins + self.ties + self.losses

    @property
    def win_rate(self) -> float:
        return self.wins / self.total if self.total else 0.0

    @property
    def win_tie_rate(self) -> float:
        return (self.wins + self.ties) / self.total if self.total else 0.0


def win_tie_loss(scores: list[float], base: list[float], tie_band: float) -> WinTieLoss:
    """Compare per (prompt, seed); |difference| < tie_band is a tie (paper: 0.01)."""
    wins = ties = losses = 0
    for s, b in zip(scores, base, strict=True):
        if abs(s - b) < tie_band:
            ties += 1
        elif s > b:
            wins += 1
        else:
            losses += 1
    return WinTieLoss(wins, ties, losses)


def summarise(records: list[dict], scales: list[float], tie_band: float) -> dict:
    """``records``: one per (scale, prompt, seed) with ``clip_score``. Scale 0 is the base model."""
    by_scale: dict[float, dict[tuple, float]] = {}
    for r in records:
        by_scale.setdefault(float(r["scale"]), {})[(r["prompt_id"], r["seed"])] = r["clip_score"]
    keys = sorted(by_scale.get(0.0, {}))
    base = [by_scale[0.0][k] for k in keys]
    per_scale = {}
    extra: dict[float, list[dict]] = {}
    for r in records:
        extra.setdefault(float(r["scale"]), []).append(r)
    for scale in scales:
        scores = [by_scale[float(scale)][k] for k in keys]
        wtl = win_tie_loss(scores, base, tie_band)
        rows = extra.get(float(scale), [])
        more = {}
        if rows and all("judge_score" in r for r in rows):
            more["judge_score"] = round(sum(r["judge_score"] for r in rows) / len(rows), 4)
        if rows and all("detected" in r for r in rows):
            more["detection_rate"] = round(sum(bool(r["detected"]) for r in rows) / len(rows), 4)
        per_scale[f"{scale:g}"] = {
            **more,
            "clip_score": round(sum(scores) / len(scores), 4) if scores else None,
            "wins": wtl.wins,
            "ties": wtl.ties,
            "losses": wtl.losses,
            "win_rate": round(wtl.win_rate, 4),
            "win_tie_rate": round(wtl.win_tie_rate, 4),
        }
    nonzero = [s for s in scales if s > 0] or list(scales)
    # Best scale: highest win-rate against the base, then highest mean CLIP score.
    best = max(
        nonzero, key=lambda s: (per_scale[f"{s:g}"]["win_rate"], per_scale[f"{s:g}"]["clip_score"] or 0)
    )
    top = per_scale[f"{best:g}"]
    return {
        "best_scale": best,
        "win_rate": top["win_rate"],
        "win_tie_rate": top["win_tie_rate"],
        "wins": top["wins"],
        "ties": top["ties"],
        "losses": top["losses"],
        "clip_score_by_scale": {k: v["clip_score"] for k, v in per_scale.items()},
        "by_scale": per_scale,
        "n_images_per_scale": len(keys),
        "tie_band": tie_band,
    }
