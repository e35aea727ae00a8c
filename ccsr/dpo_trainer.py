"""Diffusion-DPO (Wallace et al. 2023): ``trainer.objective: dpo``, the LoRA trainer on (prompt, winner, loser)
preference pairs instead of the selected pairs.

With l(x) the per-sample MSE of the prediction target, logits = (l_ref(w) - l_ref(l)) - (l(w) - l(l)) and the
loss is ``-logsigmoid(dpo_beta * logits)``, diffusers' convention (``train_diffusion_dpo.py``): without the
paper's 1/2 factor, so ``dpo_beta`` 2500 is the paper's beta 5000. ``dpo_sft_weight`` adds the plain denoising
loss on the winners; the prior term adds on as for sft (:class:`ccsr.trainer.LoRATrainer`). A pair's two
images share flip, noise and timestep (:class:`ccsr.batches.PreferenceStream`).

The reference is the model the candidates were drawn with: the base (the UNet's adapters disabled) or the
champion LoRA at the generation scale, a second peft adapter that is never trained; both run without
gradients, before the trained adapter's forward pass. Everything else (setup, resume, checkpoints, the prior
term, saving) is the base trainer's.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ccsr import lora
from ccsr.batches import PreferenceBatch, PreferenceStream
from ccsr.config import ConfigError
from ccsr.seeds import PREFERENCES_DRAWS, PREFERENCES_ORDER
from ccsr.trainer import LoRATrainer

if TYPE_CHECKING:
    import torch

    from ccsr.config import TrainerConfig
    from ccsr.training_data import EncodingCache, FrozenEncoder, PreferencePair, TrainJob, TrainPair

logger = logging.getLogger(__name__)


class DPOTrainer(LoRATrainer):
    """One Diffusion-DPO LoRA training run against a frozen reference (the job's ``reference_lora`` at
    ``reference_scale``, or the base model when there is none)."""

    trains_on = "preferences"
    nothing_to_train = "no preference pairs"

    # ---- what the train stage asks of the objective

    @classmethod
    def check_settings(cls, cfg: TrainerConfig) -> None:
        """The trainer settings DPO has no use for must be off (raises ConfigError)."""
        if cfg.reward_weighted:
            raise ConfigError("'trainer.reward_weighted' applies to objective sft only; set it false for dpo")
        if cfg.snr_gamma is not None:
            raise ConfigError("'trainer.snr_gamma' applies to objective sft only; set it null for dpo")

    @classmethod
    def check_examples(
        cls, pairs: list[TrainPair], preferences: list[PreferencePair], reference_lora: Path | None
    ) -> None:
        """Preference pairs (no plain pairs) whose images exist, and the reference LoRA if one is given."""
        if not preferences:
            raise ValueError(
                "trainer.objective dpo needs at least one preference pair (winner, loser); got none"
            )
        if pairs:
            raise ValueError(
                "trainer.objective dpo trains on the preference pairs, not on pairs: pass pairs=[]"
            )
        paths = [Path(path) for p in preferences for path in (p.winner_path, p.loser_path)]
        missing = [str(path) for path in paths if not path.is_file()]
        if missing:
            raise ValueError(f"preference image not found: {missing[0]} ({len(missing)} missing in total)")
        if reference_lora is not None and not Path(reference_lora).exists():
            raise ValueError(f"reference LoRA {reference_lora} does not exist")

    @classmethod
    def fingerprint_inputs(cls, job: TrainJob) -> dict[str, Any]:
        """The pairs' prompts and image hashes, the reference LoRA's hash and scale."""
        reference_hash = lora.weights_hash(job.reference_lora)
        pairs = zip(job.preferences, job.preference_hashes, strict=True)
        return {
            "preferences": [[p.prompt, winner, loser] for p, (winner, loser) in pairs],
            "reference_lora": reference_hash,
            # The base model as reference has no scale.
            "reference_scale": float(job.reference_scale) if reference_hash is not None else None,
        }

    @classmethod
    def stage_info(cls, job: TrainJob) -> dict[str, Any]:
        return {"preferences": len(job.preferences)}

    # ---- setup and data

    def _add_frozen_adapters(self) -> None:
        """The reference LoRA as a second, frozen adapter of the same UNet (no second UNet)."""
        job = self.job
        if job.reference_lora is not None:
            lora.add_frozen_adapter(
                self.unet, job.reference_lora, lora.REFERENCE_ADAPTER, job.reference_scale, self.device
            )
            logger.info("DPO reference: LoRA %s at scale %g", job.reference_lora, job.reference_scale)

    def num_examples(self) -> int:
        return len(self.job.preferences)

    def example_stream(self, encoder: FrozenEncoder, encode_now: bool, common: dict) -> PreferenceStream:
        """The preference pairs' stream, the winners and the losers each with an encoding cache of their own."""
        job = self.job
        caches: tuple[EncodingCache | None, EncodingCache | None] = (None, None)
        if encode_now:
            winners, losers = zip(*(p.sides() for p in job.preferences), strict=True)
            winner_hashes, loser_hashes = zip(*job.preference_hashes, strict=True)
            caches = (
                self._encoding_cache(encoder, list(winners), list(winner_hashes)),
                self._encoding_cache(encoder, list(losers), list(loser_hashes)),
            )
        return PreferenceStream(
            "preference pairs",
            job.preferences,
            order_key=PREFERENCES_ORDER,
            draw_key=PREFERENCES_DRAWS,
            caches=caches,
            **common,
        )

    # ---- the loss

    @contextmanager
    def _reference_model(self):
        """The UNet as Diffusion-DPO's reference, without gradients: the base model (adapters disabled) or the
        reference LoRA alone at its scale. The trained adapter is active (and trainable) again afterwards."""
        import torch

        base_reference = self.job.reference_lora is None
        if base_reference:
            self.unet.disable_adapters()
        else:
            self.unet.set_adapter(lora.REFERENCE_ADAPTER)
        try:
            with torch.no_grad():
                yield
        finally:
            if base_reference:
                self.unet.enable_adapters()
            else:
                self.unet.set_adapter(lora.ADAPTER_NAME)

    def dpo_terms(self, batch: PreferenceBatch) -> dict[str, torch.Tensor]:
        """Diffusion-DPO on this process's slice, each term its share of the global-batch mean.

        l(x) is the per-sample MSE of the prediction target; logits = (l_ref(w) - l_ref(l)) - (l(w) - l(l)),
        positive when the model prefers the winner more than the reference does. The reference runs first, so
        the backward pass only ever sees the trained adapter active.
        """
        import torch
        import torch.nn.functional as F

        winner, loser = self._model_inputs(batch.winner), self._model_inputs(batch.loser)
        inputs = [torch.cat(parts) for parts in zip(winner, loser, strict=True)]
        with self._reference_model():
            ref = self._per_sample_loss(*inputs)
        model = self._per_sample_loss(*inputs)
        n, size = len(batch.winner.indices), batch.winner.global_size
        model_w, model_l, ref_w, ref_l = model[:n], model[n:], ref[:n], ref[n:]
        logits = (ref_w - ref_l) - (model_w - model_l)
        return {
            "dpo_loss": -F.logsigmoid(self.cfg.dpo_beta * logits).sum() / size,
            "implicit_acc": (logits > 0).float().sum() / size,
            "winner_loss": model_w.sum() / size,
            "winner_vs_ref": (model_w - ref_w).detach().sum() / size,
        }

    def objective_log_names(self) -> list[str]:
        """dpo_loss; implicit_acc, the share of pairs with logits > 0 (diffusers counts a tie as half; here it
        counts as a miss, so a model equal to its reference scores 0); winner_loss, the model's denoising loss
        on the winners; winner_vs_ref, that minus the reference's (rising above 0 is the warning sign that DPO
        buys the margin by making the winners worse too); sft_loss (= winner_loss) when it is weighted in."""
        names = ["dpo_loss", "implicit_acc", "winner_loss", "winner_vs_ref"]
        return names + ["sft_loss"] if self.cfg.dpo_sft_weight > 0 else names

    def objective_loss(self, batch: PreferenceBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """dpo_loss + dpo_sft_weight * winner_loss."""
        terms = self.dpo_terms(batch)
        loss = terms["dpo_loss"]
        logs = {}
        if self.cfg.dpo_sft_weight > 0:
            loss = loss + self.cfg.dpo_sft_weight * terms["winner_loss"]
            logs["sft_loss"] = terms["winner_loss"].detach().item()
        for name in ("dpo_loss", "implicit_acc", "winner_loss", "winner_vs_ref"):
            logs[name] = terms[name].detach().item()
        return loss, logs
