"""LoRA fine-tuning of the UNet on the selected (prompt, image) pairs: step 5 of the loop (paper section 3).

The paper's recipe (rank 4 on the attention projections, lr 1e-4 constant, batch 18, 100 epochs, 512 px,
random horizontal flip, fp16 mixed precision) lives in :class:`ccsr.config.TrainerConfig`. The module reads
top to bottom: :class:`LoRATrainer` sets up (accelerator, frozen pipeline parts, peft LoRA on the UNet,
optimizer, lr scheduler), resumes from a checkpoint, encodes the data (once, when ``cache_latents`` is on,
see :mod:`ccsr.training_data`), then runs training steps over micro-batch streams (:mod:`ccsr.batches`),
checkpoints (:mod:`ccsr.checkpoints`) and writes a diffusers-format LoRA (:mod:`ccsr.lora`). What it trains
is one :class:`ccsr.training_data.TrainJob`, resolved by the train stage, :mod:`ccsr.train`.

The objective (``trainer.objective``): this class is ``sft``, the paper's, which is the fidelity term plus
``beta`` times the prior term (Lee et al. 2023, eq. 2), each a :meth:`LoRATrainer.denoising_loss`. Another
objective is a subclass in a file of its own (``ccsr.dpo_trainer``) and an entry in ``ccsr.train.TRAINERS``:
it overrides :meth:`LoRATrainer.objective_loss` (its term on one micro-batch), and where it needs to the
stream it trains on, the names of its logged terms, its checks of the examples and what of its inputs goes
into the fingerprint. The prior term, setup, resume, checkpoints and saving stay here, the same for all.

Reproducibility does not depend on where a run was interrupted: every random draw comes from a generator
seeded by the step (see :mod:`ccsr.batches` and :mod:`ccsr.seeds`), so a resumed run draws exactly what the
uninterrupted run drew. Nor does it depend on the number of processes (``accelerate launch`` / torchrun, see
``ccsr.train_cli``): each process draws the whole global batch's numbers and keeps its slice, so only the
float summation order differs.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ccsr import checkpoints, lora
from ccsr.batches import DenoisingBatch, MicroBatchStream, epoch_layout
from ccsr.distributed import StopRequested, all_reduce_gradients, check_ranks_in_sync
from ccsr.rundir import atomic_write_text
from ccsr.seeds import PAIRS_DRAWS, PAIRS_ORDER, PRIOR_DRAWS, PRIOR_ORDER
from ccsr.training_data import (
    EncodingCache,
    FrozenEncoder,
    FrozenParts,
    TrainPair,
    load_frozen_parts,
    prepare_prior,
)

if TYPE_CHECKING:
    import torch

    from ccsr.config import TrainerConfig
    from ccsr.training_data import PreferencePair, TrainJob

__all__ = ["RESULT_FILE", "LoRATrainer", "TrainResult", "min_snr_weight"]

logger = logging.getLogger(__name__)

RESULT_FILE = "train_result.json"


@dataclass
class TrainResult:
    lora_dir: Path
    steps: int
    final_loss: float
    seconds: float


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon-prediction,
    min(SNR, gamma) / (SNR + 1) for v-prediction. A zero-terminal-SNR schedule has SNR 0 at its last step,
    where the epsilon weight's limit is 1 (not 0 / 0)."""
    import torch

    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return torch.where(snr > 0, clipped / snr.clamp(min=1e-12), torch.ones_like(snr))
    return clipped / (snr + 1)


def loss_weights(pairs: list[TrainPair], reward_weighted: bool) -> list[float]:
    """Per-pair loss weights. Reward-weighted: proportional to max(score, 0), mean 1 (Lee et al. 2023, eq. 2)."""
    if not reward_weighted:
        return [1.0] * len(pairs)
    clipped = [max(float(p.score), 0.0) for p in pairs]
    total = sum(clipped)
    if total == 0.0:
        logger.warning("reward-weighted loss: every score is <= 0, falling back to uniform weights")
        return [1.0] * len(pairs)
    return [c * len(pairs) / total for c in clipped]


def make_accelerator(out_dir: Path, mixed_precision: str, device: torch.device):
    """(accelerate's Accelerator for one training run, whether it logs to TensorBoard).

    Gradient accumulation is done by hand (the micro-batch streams are indexed by step, for exact resume),
    so accelerate must not also divide the loss in backward(). Under a launcher on a CPU-only box,
    `--cpu --num_processes 2` silently runs one process; `--multi_gpu` with cpu=True runs two on gloo.
    TensorBoard is an optional extra: logged through accelerate's tracker only when it is importable.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, is_tensorboard_available

    if device.type == "cpu" and mixed_precision == "fp16":
        logger.warning("trainer.mixed_precision=fp16 needs a GPU; training in float32 on the CPU")
        mixed_precision = "no"
    tracking = is_tensorboard_available()
    project = ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir / "tensorboard"))
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        cpu=device.type == "cpu",
        log_with="tensorboard" if tracking else None,
        project_config=project if tracking else None,
    )
    return accelerator, tracking


def grad_scaler(accelerator):
    """accelerate's GradScaler under fp16 on a GPU, else None (bf16 and float32 scale no loss)."""
    scaler = accelerator.scaler
    return scaler if scaler is not None and scaler.is_enabled() else None


def tracker_config(cfg: TrainerConfig, seed: int, model_name: str) -> dict[str, Any]:
    """Scalar trainer settings for the tracker's hyper-parameter table (it accepts no lists or None)."""
    values = {f"trainer.{k}": v for k, v in asdict(cfg).items()}
    values.update({"seed": seed, "generator.model": model_name})
    return {k: v for k, v in values.items() if isinstance(v, (bool, int, float, str))}


# The objective's name and Diffusion-DPO's settings came after the first sft LoRAs were trained: the plain sft
# trainer leaves them out of its fingerprint, so those LoRAs and checkpoints keep theirs (and are reused).
SFT_FINGERPRINT_LEFT_OUT = ("objective", "dpo_beta", "dpo_sft_weight")


class LoRATrainer:
    """One LoRA training run of objective sft: ``__init__`` sets everything up, :meth:`train` runs (or
    resumes) it. Checkpoints and a finished result are trusted only under the job's fingerprint."""

    # What the objective trains on: the run directory's "pairs" or "preferences" records (``ccsr.train``).
    trains_on = "pairs"
    # The train stage's reason for skipping an iteration that brought none of those records.
    nothing_to_train = "no new pairs"

    # ---- what the config and the train stage ask of the objective before any model is loaded

    @classmethod
    def check_settings(cls, cfg: TrainerConfig) -> None:
        """Raise ConfigError for trainer settings this objective cannot use (sft uses them all)."""

    @classmethod
    def check_examples(
        cls, pairs: list[TrainPair], preferences: list[PreferencePair], reference_lora: Path | None
    ) -> None:
        """Raise ValueError unless the job's examples are this objective's (their files are checked after)."""
        if not pairs:
            raise ValueError("train_lora needs at least one (prompt, image) pair")
        if preferences or reference_lora is not None:
            raise ValueError("preferences and reference_lora are inputs of trainer.objective dpo (it is sft)")

    @classmethod
    def fingerprint_left_out(cls) -> tuple[str, ...]:
        """Trainer settings left out of the fingerprint (those the weights do not depend on are always)."""
        return SFT_FINGERPRINT_LEFT_OUT if cls is LoRATrainer else ()

    @classmethod
    def fingerprint_inputs(cls, job: TrainJob) -> dict[str, Any] | None:
        """What the weights depend on besides the config, the pairs and the init LoRA; None for nothing."""
        return None

    @classmethod
    def stage_info(cls, job: TrainJob) -> dict[str, Any]:
        """What the train stage records of this objective's inputs, besides what every objective records."""
        return {}

    # ---- setup

    def __init__(
        self, trainer_cfg: TrainerConfig, seed: int, job: TrainJob, *, device: torch.device, model_name: str
    ):
        """``device``: where to train; ``model_name``: the configured ``generator.model`` (for the tracker)."""
        self.started = time.perf_counter()
        self.cfg, self.seed, self.job = trainer_cfg, seed, job
        self.out_dir, self.model_path, self.fingerprint = job.out_dir, job.model_path, job.fingerprint
        self.model_name = model_name
        self.accelerator, self.tracking = make_accelerator(self.out_dir, trainer_cfg.mixed_precision, device)
        self.device, self.is_main = self.accelerator.device, self.accelerator.is_main_process
        self.num_processes = self.accelerator.num_processes
        self.process_index = self.accelerator.process_index
        self.checkpoint_root = self.out_dir / checkpoints.CHECKPOINTS_DIR
        parts = self._load_frozen_parts()
        # Drawn by the base UNet, i.e. before the LoRA is added (and before any init LoRA).
        self.prior_pairs, self.prior_hashes = prepare_prior(
            job.prior, seed, self.model_path, job.prior_dir, parts, self.weight_dtype, self.accelerator
        )
        self._add_adapter()
        self._setup_optimizer()
        # The loss terms compute_loss reports, in the order they are reduced over processes and logged.
        self.log_names = ["loss", *self.objective_log_names(), *(["prior_loss"] if self.prior_pairs else [])]

    def _load_frozen_parts(self) -> FrozenParts:
        """The pipeline parts, in the mixed-precision dtype (the trainable adapter is float32 regardless)."""
        import torch

        dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
        self.weight_dtype = dtypes.get(self.accelerator.mixed_precision, torch.float32)
        parts = load_frozen_parts(self.model_path, self.weight_dtype, self.device)
        self.tokenizer, self.text_encoder, self.vae = parts.tokenizer, parts.text_encoder, parts.vae
        self.unet, self.noise_scheduler = parts.unet, parts.noise_scheduler
        self.prediction_type = self.noise_scheduler.config.prediction_type
        # Per-sample latent shape, for drawing the whole global batch's noise on every process.
        side = self.cfg.resolution // 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_shape = (self.vae.config.latent_channels, side, side)
        return parts

    def _add_adapter(self) -> None:
        """A peft LoRA on the UNet's attention projections (paper: rank 4), set from the job's init LoRA if
        it has one; then the objective's frozen adapters, if any."""
        import torch
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        cfg = self.cfg
        config = LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            init_lora_weights="gaussian",
            target_modules=list(cfg.target_modules),
        )
        # peft's gaussian init of lora_A draws from the global generator: seed it without disturbing the caller.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.unet.add_adapter(config, adapter_name=lora.ADAPTER_NAME)
        # The adapter is made in the UNet's dtype (fp16/bf16 under mixed precision); the trainable weights are
        # float32, and become so before an init LoRA is copied in, which would otherwise be rounded to half.
        cast_training_params(self.unet, dtype=torch.float32)
        if self.job.init_lora is not None:
            lora.load_into(self.unet, self.job.init_lora, cfg.rank)
            logger.info("LoRA initialised from %s", self.job.init_lora)
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.unet.train()
        self._add_frozen_adapters()
        # A list, not a generator: clip_grad_norm_ on an exhausted iterator silently clips nothing.
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        trained = {id(p) for name, p in self.unet.named_parameters() if f".{lora.ADAPTER_NAME}." in name}
        if {id(p) for p in self.params} != trained:
            raise RuntimeError("only the trained LoRA adapter may have trainable parameters")

    def _add_frozen_adapters(self) -> None:
        """Adapters of the same UNet that are never trained (sft has none)."""

    def _setup_optimizer(self) -> None:
        import torch
        from diffusers.optimization import get_scheduler

        cfg = self.cfg
        optimizer = torch.optim.AdamW(
            self.params, lr=cfg.learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8
        )
        self.batch_size, self.batches_per_epoch = epoch_layout(self.num_examples(), cfg.batch_size)
        self.accumulation = cfg.gradient_accumulation_steps
        self.total_steps = cfg.max_steps or math.ceil(cfg.epochs * self.batches_per_epoch / self.accumulation)
        self.lr_scheduler = get_scheduler(
            cfg.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=cfg.lr_warmup_steps,
            num_training_steps=self.total_steps,
        )
        # The lr scheduler is stepped by hand, once per optimizer step, so it does not depend on process count.
        # The UNet is not wrapped in DDP: gradients are summed explicitly (all_reduce_gradients says why), and
        # every replica starts from the same weights (seeded LoRA init, same init/checkpoint files).
        self.optimizer = self.accelerator.prepare(optimizer)

    def num_examples(self) -> int:
        """How many examples an epoch goes through."""
        return len(self.job.pairs)

    # ---- resume and checkpoints

    def resume(self) -> tuple[int, dict | None]:
        """Load the newest valid checkpoint (if any); return (its step or 0, its state)."""
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        start_step, state = 0, None
        found = checkpoints.latest_checkpoint(self.checkpoint_root, self.fingerprint)
        if found is not None:
            path, state = found
            scaler = grad_scaler(self.accelerator)
            checkpoints.restore(path, self.unet, self.optimizer, self.lr_scheduler, scaler)
            start_step = state["step"]
            logger.info("resuming LoRA training from %s (step %d of %d)", path, start_step, self.total_steps)
        self.accelerator.wait_for_everyone()  # every process has read its checkpoint before the main one prunes
        if self.is_main:
            checkpoints.rewrite_log(self.out_dir / checkpoints.TRAIN_LOG, start_step)
            checkpoints.drop_checkpoints_after(self.checkpoint_root, start_step)
        return start_step, state

    def checkpoint(self, done: int, loss: float) -> None:
        micro_batches = done * self.accumulation
        state = {
            "step": done,
            "fingerprint": self.fingerprint,
            "micro_batches_done": micro_batches,
            "epoch": micro_batches // self.batches_per_epoch,
            "batch_in_epoch": micro_batches % self.batches_per_epoch,
            "seed": self.seed,
            "loss": loss,
        }
        states = checkpoints.training_states(self.optimizer, self.lr_scheduler, grad_scaler(self.accelerator))
        adapter, kept = lora.adapter_state(self.unet), self.cfg.checkpoints_kept
        checkpoints.write_checkpoint(self.checkpoint_root, done, adapter, states, state, kept)

    # ---- data

    def _encoding_cache(self, encoder: FrozenEncoder, pairs: list[TrainPair], hashes: list[str]):
        # With a cache folder the main process encodes and writes first, the others then load its files
        # (bit-identical to its in-memory tensors); without one, every process encodes for itself.
        cache_dir = self.job.encode_cache_dir
        with self.accelerator.main_process_first() if cache_dir is not None else nullcontext():
            return EncodingCache(
                encoder, pairs, hashes, self.cfg.random_flip, cache_dir, self.batch_size, write=self.is_main
            )

    def _build_streams(self, start_step: int) -> None:
        """``self.stream`` over the examples (:meth:`example_stream`) and ``self.prior_stream`` over the prior
        images (None without them). The prior set runs its own epochs (its size differs from the examples')
        and draws from its own generators, so the objective term's numbers are the same with and without it."""
        cfg = self.cfg
        frozen = (self.vae, self.text_encoder, self.tokenizer, cfg.resolution, self.device, self.weight_dtype)
        encoder = FrozenEncoder(self.model_path, *frozen)
        encode_now = cfg.cache_latents and start_step < self.total_steps
        common = dict(
            seed=self.seed,
            batch_size=self.batch_size,
            accumulation=self.accumulation,
            trainer_cfg=cfg,
            num_train_timesteps=self.noise_scheduler.config.num_train_timesteps,
            latent_shape=self.latent_shape,
            encoder=encoder,
            num_processes=self.num_processes,
            process_index=self.process_index,
        )
        self.stream = self.example_stream(encoder, encode_now, common)
        self.prior_stream = None
        if self.prior_pairs:
            pairs, ones = self.prior_pairs, [1.0] * len(self.prior_pairs)
            cache = self._encoding_cache(encoder, pairs, self.prior_hashes) if encode_now else None
            keys = dict(order_key=PRIOR_ORDER, draw_key=PRIOR_DRAWS)
            self.prior_stream = MicroBatchStream("prior images", pairs, ones, **keys, cache=cache, **common)

    def example_stream(self, encoder: FrozenEncoder, encode_now: bool, common: dict) -> MicroBatchStream:
        """The stream of the examples the objective trains on: the pairs, weighted (``reward_weighted``)."""
        job = self.job
        cache = self._encoding_cache(encoder, job.pairs, job.image_hashes) if encode_now else None
        weights = loss_weights(job.pairs, self.cfg.reward_weighted)
        return MicroBatchStream(
            "pairs", job.pairs, weights, order_key=PAIRS_ORDER, draw_key=PAIRS_DRAWS, cache=cache, **common
        )

    # ---- the loss

    def _model_inputs(self, batch: DenoisingBatch) -> tuple[torch.Tensor, ...]:
        """(noisy latents, timesteps, caption embeddings, prediction target) of ``batch``, on the device."""
        device, scheduler = self.device, self.noise_scheduler
        latent = batch.latent_mean + batch.latent_std * batch.latent_draw
        latents = (latent * self.vae.config.scaling_factor).to(device)
        noise = batch.noise.to(device)
        timesteps = batch.timesteps.to(device)
        text = batch.text.to(device, self.weight_dtype)

        noisy = scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "epsilon":
            target = noise
        else:
            target = scheduler.get_velocity(latents, noise, timesteps)
        return noisy, timesteps, text, target

    def _per_sample_loss(self, noisy, timesteps, text, target) -> torch.Tensor:
        """The UNet's (as it is now) mean squared error on each sample."""
        import torch.nn.functional as F

        with self.accelerator.autocast():
            pred = self.unet(noisy.to(self.weight_dtype), timesteps, text, return_dict=False)[0]
        return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))

    def denoising_loss(self, batch: DenoisingBatch) -> torch.Tensor:
        """This process's share of the (weighted) global-batch mean of the denoising loss on ``batch``."""
        from diffusers.training_utils import compute_snr

        device, scheduler = self.device, self.noise_scheduler
        noisy, timesteps, text, target = self._model_inputs(batch)
        per_sample = self._per_sample_loss(noisy, timesteps, text, target)
        weights = batch.weights.to(device)
        if self.cfg.snr_gamma is not None:
            snr = compute_snr(scheduler, timesteps)
            weights = weights * min_snr_weight(snr, self.cfg.snr_gamma, self.prediction_type)
        # This process's part of the global-batch mean; summed over processes it is that mean.
        return (per_sample * weights).sum() / batch.global_size

    def objective_log_names(self) -> list[str]:
        """The objective term's logged parts (between ``loss`` and ``prior_loss``)."""
        return ["fidelity_loss"] if self.prior_pairs else []

    def objective_loss(self, batch: DenoisingBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """The objective's term on one micro-batch of its stream, and its logged parts as floats; sft: the
        fidelity term, the (reward-weighted) denoising loss on the pairs (Lee et al. 2023, eq. 2)."""
        fidelity = self.denoising_loss(batch)
        return fidelity, ({"fidelity_loss": fidelity.detach().item()} if self.prior_pairs else {})

    def compute_loss(self, batch: Any, prior: DenoisingBatch | None) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss to backpropagate, its terms as floats keyed by ``self.log_names``) of one micro-batch.

        loss = the objective's term + beta (``prior_weight``) * the (unweighted) denoising loss on the prior
        images (Lee et al. 2023, eq. 2; prior_loss is logged unweighted). At least one slice is non-empty.
        """
        import torch

        loss = torch.zeros((), device=self.device)
        logs = dict.fromkeys(self.log_names, 0.0)
        if batch is not None:
            loss, parts = self.objective_loss(batch)
            logs.update(parts)
        if prior is not None:
            prior_loss = self.denoising_loss(prior)
            loss = loss + self.cfg.prior_weight * prior_loss
            logs["prior_loss"] = prior_loss.detach().item()
        logs["loss"] = loss.detach().item()
        return loss, logs

    # ---- training

    def training_step(self, step: int) -> dict[str, float]:
        """Optimizer step ``step`` (0-based) over its micro-batches; the mean of each logged term."""
        import torch

        totals = dict.fromkeys(self.log_names, 0.0)
        for micro in range(self.accumulation):
            batch = self.stream.batch(step, micro)
            prior = self.prior_stream.batch(step, micro) if self.prior_stream is not None else None
            if batch is None and prior is None:
                # More processes than samples in this batch: a zero loss still gives every parameter a
                # (zero) gradient, so the collective below and a GradScaler see the same thing everywhere.
                self.accelerator.backward(sum(p.sum() for p in self.params) * 0.0)
                continue
            loss, logs = self.compute_loss(batch, prior)
            self.accelerator.backward(loss / self.accumulation)
            for name, value in logs.items():
                totals[name] += value / self.accumulation
        if self.num_processes > 1:
            all_reduce_gradients(self.accelerator, self.params)
            values = torch.tensor(list(totals.values()), dtype=torch.float64, device=self.device)
            totals = dict(zip(totals, self.accelerator.reduce(values).tolist(), strict=True))
        if self.cfg.max_grad_norm and self.cfg.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return totals

    def train(
        self,
        on_step: Callable[[int, float], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> TrainResult:
        """Resume, run the remaining steps (log, checkpoint, ``on_step`` after each), save the LoRA.

        ``should_stop`` is asked after every optimizer step (the training stage's unit; with several
        processes it must answer the same on all of them): when it says stop, the step just taken is
        checkpointed and ``StopRequested`` raised, so a restart continues from exactly that step."""
        from ccsr.console import bar

        start_step, resumed = self.resume()
        self._build_streams(start_step)
        if self.tracking:
            self.accelerator.init_trackers(
                "lora", config=tracker_config(self.cfg, self.seed, self.model_name)
            )
        # Steps, loss, lr and ETA (tqdm's remaining-time estimate) on the main process only.
        progress = bar(
            total=self.total_steps,
            initial=start_step,
            desc="train · LoRA",
            unit="step",
            disable=not self.is_main,
        )
        loss = float("nan") if resumed is None else float(resumed.get("loss", float("nan")))
        for step in range(start_step, self.total_steps):
            lr = self.lr_scheduler.get_last_lr()[0]
            logs = self.training_step(step)
            done, loss = step + 1, logs["loss"]
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            self._log(done, logs, lr)
            scheduled = bool(self.cfg.checkpoint_every) and done % self.cfg.checkpoint_every == 0
            if self.is_main and scheduled and done < self.total_steps:
                self.checkpoint(done, loss)
            if on_step is not None:
                on_step(done, loss)
            if should_stop is not None and done < self.total_steps and should_stop():
                progress.close()
                self._stop_at(done, loss, checkpointed=scheduled)
        progress.close()
        if self.tracking:
            # Not accelerator.end_training(): it also destroys the process group, which the caller may reuse.
            for tracker in self.accelerator.trackers:
                tracker.finish()
        return self.save(loss)

    def _stop_at(self, done: int, loss: float, checkpointed: bool) -> None:
        """Stop after step ``done``: its checkpoint is on disk (written now unless it already was)."""
        if self.is_main and not checkpointed:
            self.checkpoint(done, loss)
        self.accelerator.wait_for_everyone()
        logger.info("training stopped after step %d of %d (checkpointed)", done, self.total_steps)
        raise StopRequested

    def _log(self, done: int, logs: dict[str, float], lr: float) -> None:
        """One line of ``train_log.jsonl`` (main process) and the tracker."""
        record = {"step": done, "loss": logs["loss"], "lr": lr}
        record.update({k: v for k, v in logs.items() if k != "loss"})
        if self.tracking:
            self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=done)
        if self.is_main:
            with open(self.out_dir / checkpoints.TRAIN_LOG, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def save(self, final_loss: float) -> TrainResult:
        """Write the LoRA and ``train_result.json`` (main process), after checking the replicas agree."""
        # The replicas never exchange weights, only gradients: check they really ended identical.
        rank_digests = check_ranks_in_sync(self.accelerator, self.unet) if self.num_processes > 1 else None
        seconds = time.perf_counter() - self.started
        if self.is_main:
            lora.save(self.unet, self.out_dir)
            result = {
                "fingerprint": self.fingerprint,
                "steps": self.total_steps,
                "final_loss": final_loss,
                "seconds": seconds,
                "num_processes": self.num_processes,
            }
            if rank_digests is not None:
                result["rank_adapter_sha256"] = rank_digests
            atomic_write_text(self.out_dir / RESULT_FILE, json.dumps(result, indent=1))
        self.accelerator.wait_for_everyone()
        steps, out_dir = self.total_steps, self.out_dir
        logger.info(
            "LoRA trained: %d steps, final loss %.4f, %.1f s -> %s", steps, final_loss, seconds, out_dir
        )
        return TrainResult(lora_dir=out_dir, steps=steps, final_loss=final_loss, seconds=seconds)
