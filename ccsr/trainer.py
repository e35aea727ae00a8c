"""LoRA fine-tuning of the UNet on the optimal (prompt, image) pairs: step 5 of the loop (paper section 3).

The paper's recipe (rank 4 on the attention projections, lr 1e-4 constant, batch 18, 100 epochs, 512 px,
random horizontal flip, fp16 mixed precision) lives in :class:`ccsr.config.TrainerConfig`. The module reads
top to bottom: :class:`LoRATrainer` sets up (accelerator, frozen pipeline parts, peft LoRA on the UNet,
optimizer, lr scheduler), resumes from a checkpoint, encodes the data (once, when ``cache_latents`` is on,
see :mod:`ccsr.training_data`), then runs training steps over a :class:`MicroBatchStream`, checkpoints
(:mod:`ccsr.checkpoints`) and writes a diffusers-format LoRA. :func:`train_lora` is the entry point.

Where an objective goes: :meth:`LoRATrainer.compute_loss` turns one micro-batch of each data stream into
``(loss, logs)``, the streams are built in ``_build_streams`` and the logged terms named in ``log_names``.
``trainer.objective: sft`` (the paper) is the fidelity term plus ``beta`` times the prior term (Lee et al.
2023, eq. 2), each a :meth:`LoRATrainer.denoising_loss` over a :class:`DenoisingBatch`.

``trainer.objective: dpo`` is Diffusion-DPO (Wallace et al. 2023) on (prompt, winner, loser) preference pairs
(:class:`PreferenceStream`: a pair's two images share flip, noise and timestep). With l(x) the per-sample MSE
of the prediction target, logits = (l_ref(w) - l_ref(l)) - (l(w) - l(l)) and the loss is
``-logsigmoid(dpo_beta * logits)``, diffusers' convention (``train_diffusion_dpo.py``): without the paper's
1/2 factor, so ``dpo_beta`` 2500 is the paper's beta 5000. ``dpo_sft_weight`` adds the plain denoising loss on
the winners, and the prior term adds on as for sft. The reference is the model the candidates were drawn
with: the base (the UNet's adapters disabled) or the champion LoRA at the generation scale, a second peft
adapter that is never trained; both run without gradients, before the trained adapter's forward pass.

Reproducibility does not depend on where a run was interrupted: every random draw of optimizer step ``s``
comes from a generator seeded by ``(cfg.seed, 1, s, micro_batch)`` (``(cfg.seed, 4, s, micro_batch)`` for the
prior images, ``(cfg.seed, 6, s, micro_batch)`` for the preference pairs) and the data order of epoch ``e`` from
``(cfg.seed, 0, e)`` (``(cfg.seed, 3, e)``, ``(cfg.seed, 5, e)``), so a resumed run draws exactly what the
uninterrupted run drew. Nor does it depend on the number of processes
(``accelerate launch`` / torchrun, see ``ccsr.train_cli``): each process draws the whole global batch's
numbers and keeps its slice, so only the float summation order differs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ccsr import checkpoints
from ccsr.compat import diffusers_dtype
from ccsr.devices import torch_device
from ccsr.inputs import check_image, check_lora
from ccsr.models import resolve_model
from ccsr.rundir import LORA_WEIGHTS_NAME, atomic_path, atomic_write_text, sha256_file
from ccsr.training_data import (
    PRIOR_DIR,
    EncodingCache,
    FrozenEncoder,
    PreferencePair,
    TrainPair,
    draw_prior,
    load_prior,
    prior_key,
    prior_prompts,
    seeded_generator,
)

if TYPE_CHECKING:
    import torch

    from ccsr.config import Config, TrainerConfig

__all__ = [
    "LoRATrainer",
    "PreferencePair",
    "TrainPair",
    "TrainResult",
    "min_snr_weight",
    "save_lora",
    "train_lora",
]

logger = logging.getLogger(__name__)

ADAPTER_NAME = "default"
REFERENCE_ADAPTER = "reference"  # Diffusion-DPO's reference LoRA: a second adapter, frozen, never saved
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


# --------------------------------------------------------------------------------------------------------------
# LoRA weights in and out


def _load_lora_into_adapter(unet, lora_dir: Path, rank: int) -> None:
    """Set the adapter's weights from a diffusers-format (or kohya-format) LoRA folder or file."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import set_peft_model_state_dict

    lora_dir = Path(lora_dir)
    if lora_dir.is_dir() and not (lora_dir / LORA_WEIGHTS_NAME).exists():
        raise ValueError(f"init LoRA folder {lora_dir} has no {LORA_WEIGHTS_NAME}")
    if not lora_dir.exists():
        raise ValueError(f"init LoRA {lora_dir} does not exist")
    kwargs = {} if lora_dir.is_dir() else {"weight_name": lora_dir.name}
    source = str(lora_dir if lora_dir.is_dir() else lora_dir.parent)
    state_dict, network_alphas = StableDiffusionPipeline.lora_state_dict(source, **kwargs)
    unet_sd = {k[len("unet.") :]: v for k, v in state_dict.items() if k.startswith("unet.")}
    if not unet_sd:
        raise ValueError(f"init LoRA {lora_dir} holds no UNet weights")
    if network_alphas:
        logger.warning(
            "init LoRA %s carries kohya alphas; they are ignored (trainer.alpha is used)", lora_dir
        )
    peft_sd = convert_unet_state_dict_to_peft(unet_sd)
    ranks = {v.shape[0] for k, v in peft_sd.items() if ".lora_A." in k}
    if ranks != {rank}:
        raise ValueError(f"init LoRA {lora_dir} has rank {sorted(ranks)}, but trainer.rank is {rank}")
    result = set_peft_model_state_dict(unet, peft_sd, adapter_name=ADAPTER_NAME)
    unexpected = getattr(result, "unexpected_keys", [])
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if unexpected or missing:
        raise ValueError(
            f"init LoRA {lora_dir} does not match trainer.target_modules "
            f"({len(unexpected)} unexpected, {len(missing)} missing keys, e.g. {(unexpected + missing)[0]})"
        )


def _adapter_state(unet) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(unet).items()}


def save_lora(unet, out_dir: Path) -> Path:
    """Write ``out_dir/pytorch_lora_weights.safetensors`` (diffusers format) atomically; return its path."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    # The adapter metadata carries lora_alpha: without it a loader assumes alpha == rank.
    metadata = unet.peft_config[ADAPTER_NAME].to_dict()
    # Sets (target_modules) iterate in a per-process hash order: sort them so the same weights give the same bytes.
    metadata = {k: sorted(v) if isinstance(v, set) else v for k, v in metadata.items()}
    path = Path(out_dir) / LORA_WEIGHTS_NAME
    with atomic_path(path) as tmp:
        StableDiffusionPipeline.save_lora_weights(
            save_directory=str(tmp.parent),
            weight_name=tmp.name,
            unet_lora_layers={k: v.detach().float().contiguous() for k, v in layers.items()},
            safe_serialization=True,
            unet_lora_adapter_metadata=metadata,
        )
    return path


# --------------------------------------------------------------------------------------------------------------
# several processes (accelerate launch / torchrun): data parallel over the global batch


def _shard(size: int, num_processes: int, process_index: int) -> tuple[int, int]:
    """[lo, hi) of this process's share of a global batch of ``size``: contiguous, sizes differ by at most 1."""
    return size * process_index // num_processes, size * (process_index + 1) // num_processes


def _all_reduce_gradients(accelerator, params: list[torch.Tensor]) -> None:
    """Sum the gradients of ``params`` over processes, in one collective on one flat buffer.

    Each process's loss is its share of the global-batch mean (sum over its samples / global batch size), so
    the sum over processes is the single-process gradient. An explicit sum rather than DDP's bucketed mean:
    shares may be unequal (batch 18 on 4 processes, the short last batch of an epoch) or empty, and the LoRA
    gradient is a few MB at most, so overlapping communication with backward buys nothing.
    """
    import torch

    for p in params:
        if p.grad is None:  # a parameter no sample reached: its gradient is zero, not missing
            p.grad = torch.zeros_like(p)
    flat = accelerator.reduce(torch.cat([p.grad.reshape(-1) for p in params]), reduction="sum")
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
        offset += p.numel()


def _adapter_digest(unet) -> str:
    """sha256 over the adapter's tensors (names, dtypes, shapes and bytes), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(_adapter_state(unet).items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def _check_ranks_in_sync(accelerator, unet) -> list[str]:
    """Every process's adapter digest (process order); raise if they differ, i.e. the replicas diverged."""
    from accelerate.utils import gather_object

    digests = gather_object([_adapter_digest(unet)])
    if len(set(digests)) != 1:
        raise RuntimeError(f"LoRA weights differ across processes after training: {digests}")
    return digests


# --------------------------------------------------------------------------------------------------------------
# micro-batches


@dataclass
class DenoisingBatch:
    """This process's slice of one global micro-batch, with everything the denoising loss needs.

    ``latent_mean``/``latent_std`` are the VAE's distribution of each (flipped where drawn) image and ``text``
    the caption embeddings (CPU, float32); ``latent_draw``, ``noise``, ``timesteps`` and ``weights`` are this
    slice's share of the global batch's draws; ``global_size`` is the global batch size the loss divides by.
    """

    source: str
    indices: list[int]
    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    text: torch.Tensor
    latent_draw: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    weights: torch.Tensor
    global_size: int


class MicroBatchStream:
    """Micro-batch ``m = step * accumulation + micro`` of one data set: its epoch permutations, its random
    draws, and this process's slice, encoded.

    Epoch ``e``'s order comes from the generator ``(seed, order_key, e)``; the draws of micro-batch ``micro``
    of step ``step`` from ``(seed, draw_key, step, micro)``, in a fixed order (flips, latent sample, noise,
    noise offset, timesteps) over the whole global batch on every process, each then keeping its slice: a
    sample gets the same flip, latent draw, noise and timestep whatever the process count, and the cached and
    uncached paths consume identical random numbers.
    """

    def __init__(
        self,
        name: str,
        pairs: list[TrainPair],
        weights: list[float],
        *,
        seed: int,
        order_key: int,
        draw_key: int,
        batch_size: int,
        accumulation: int,
        trainer_cfg: TrainerConfig,
        num_train_timesteps: int,
        latent_shape: tuple[int, int, int],
        encoder: FrozenEncoder,
        cache: EncodingCache | None,
        num_processes: int,
        process_index: int,
    ):
        import torch

        self.name = name
        self.pairs = pairs
        self.weights = torch.tensor(weights)
        self.seed, self.order_key, self.draw_key = seed, order_key, draw_key
        self.batch_size = min(batch_size, len(pairs))
        self.batches_per_epoch = math.ceil(len(pairs) / self.batch_size)
        self.accumulation = accumulation
        self.random_flip = trainer_cfg.random_flip
        self.noise_offset = trainer_cfg.noise_offset
        self.num_train_timesteps = num_train_timesteps
        self.latent_shape = latent_shape
        self.encoder, self.cache = encoder, cache
        self.num_processes, self.process_index = num_processes, process_index
        self._permutations: dict[int, list[int]] = {}

    def indices(self, m: int) -> list[int]:
        """The global micro-batch ``m``: a slice of its epoch's permutation."""
        import torch

        epoch, position = divmod(m, self.batches_per_epoch)
        if epoch not in self._permutations:
            g = seeded_generator(self.seed, self.order_key, epoch)
            self._permutations[epoch] = torch.randperm(len(self.pairs), generator=g).tolist()
        return self._permutations[epoch][position * self.batch_size : (position + 1) * self.batch_size]

    def draws(
        self, g: torch.Generator, size: int
    ) -> tuple[list[bool], torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flips, latent sample, noise and timesteps of a global batch of ``size``, in the fixed order."""
        import torch

        shape = self.latent_shape
        flips = (torch.rand(size, generator=g) < 0.5).tolist() if self.random_flip else [False] * size
        latent_draw = torch.randn((size, *shape), generator=g)
        noise = torch.randn((size, *shape), generator=g)
        if self.noise_offset:
            noise = noise + self.noise_offset * torch.randn((size, shape[0], 1, 1), generator=g)
        timesteps = torch.randint(0, self.num_train_timesteps, (size,), generator=g)
        return flips, latent_draw, noise, timesteps

    def batch(self, step: int, micro: int) -> DenoisingBatch | None:
        """This process's slice of micro-batch ``micro`` of optimizer step ``step``; None if the slice is empty."""
        indices = self.indices(step * self.accumulation + micro)
        size = len(indices)
        flips, latent_draw, noise, timesteps = self.draws(
            seeded_generator(self.seed, self.draw_key, step, micro), size
        )
        lo, hi = _shard(size, self.num_processes, self.process_index)
        mine = indices[lo:hi]
        if not mine:
            return None
        return self._slice(
            self.pairs,
            self.cache,
            mine,
            flips[lo:hi],
            latent_draw[lo:hi],
            noise[lo:hi],
            timesteps[lo:hi],
            size,
        )

    def _slice(
        self,
        pairs: list[TrainPair],
        cache: EncodingCache | None,
        mine: list[int],
        flips: list[bool],
        latent_draw: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        global_size: int,
    ) -> DenoisingBatch:
        """The samples ``mine`` of ``pairs`` encoded (from ``cache`` when there is one), with their draws."""
        if cache is not None:
            mean, std, text = cache.batch(mine, flips)
        else:
            mean, std = self.encoder.latent_distribution([pairs[i].image_path for i in mine], flips)
            text = self.encoder.text_embeddings([pairs[i].prompt for i in mine])
        if tuple(mean.shape[1:]) != self.latent_shape:
            raise RuntimeError(
                f"VAE latents of the {self.name} are {tuple(mean.shape[1:])}, expected {self.latent_shape}"
            )
        return DenoisingBatch(
            source=self.name,
            indices=mine,
            latent_mean=mean,
            latent_std=std,
            text=text,
            latent_draw=latent_draw,
            noise=noise,
            timesteps=timesteps,
            weights=self.weights[mine],
            global_size=global_size,
        )


@dataclass
class PreferenceBatch:
    """This process's slice of one global micro-batch of preference pairs: the winners and the losers, sample
    i of each from the same pair, with the same flip, noise and timestep (their latent draws differ)."""

    winner: DenoisingBatch
    loser: DenoisingBatch


class PreferenceStream(MicroBatchStream):
    """Micro-batches of (winner, loser) pairs for Diffusion-DPO: the epochs, seeding and process slices of
    :class:`MicroBatchStream` over the preference pairs, and per global batch the draws in this fixed order:
    flips, the winners' latent sample, the losers' latent sample, noise, noise offset, timesteps. A pair's two
    images share the flip, the noise and the timestep, so the loss difference between them measures the images,
    not the draws (Wallace et al. 2023; diffusers' train_diffusion_dpo.py does the same).
    """

    def __init__(
        self,
        name: str,
        preferences: list[PreferencePair],
        *,
        caches: tuple[EncodingCache | None, EncodingCache | None],
        **common: Any,
    ):
        sides = [p.sides() for p in preferences]
        super().__init__(name, [w for w, _ in sides], [1.0] * len(sides), cache=caches[0], **common)
        self.losers, self.loser_cache = [lo for _, lo in sides], caches[1]

    def pair_draws(
        self, g: torch.Generator, size: int
    ) -> tuple[list[bool], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flips, winners' and losers' latent samples, noise and timesteps of a global batch, in the fixed order."""
        import torch

        shape = self.latent_shape
        flips = (torch.rand(size, generator=g) < 0.5).tolist() if self.random_flip else [False] * size
        winner_draw = torch.randn((size, *shape), generator=g)
        loser_draw = torch.randn((size, *shape), generator=g)
        noise = torch.randn((size, *shape), generator=g)
        if self.noise_offset:
            noise = noise + self.noise_offset * torch.randn((size, shape[0], 1, 1), generator=g)
        timesteps = torch.randint(0, self.num_train_timesteps, (size,), generator=g)
        return flips, winner_draw, loser_draw, noise, timesteps

    def batch(self, step: int, micro: int) -> PreferenceBatch | None:
        """This process's slice of micro-batch ``micro`` of optimizer step ``step``; None if the slice is empty."""
        indices = self.indices(step * self.accumulation + micro)
        size = len(indices)
        g = seeded_generator(self.seed, self.draw_key, step, micro)
        flips, winner_draw, loser_draw, noise, timesteps = self.pair_draws(g, size)
        lo, hi = _shard(size, self.num_processes, self.process_index)
        mine = indices[lo:hi]
        if not mine:
            return None
        shared = (flips[lo:hi], noise[lo:hi], timesteps[lo:hi])

        def side(pairs: list[TrainPair], cache: EncodingCache | None, draw: torch.Tensor) -> DenoisingBatch:
            flip, eps, t = shared
            return self._slice(pairs, cache, mine, flip, draw[lo:hi], eps, t, size)

        return PreferenceBatch(
            winner=side(self.pairs, self.cache, winner_draw),
            loser=side(self.losers, self.loser_cache, loser_draw),
        )


# --------------------------------------------------------------------------------------------------------------
# the trainer


def _loss_weights(pairs: list[TrainPair], reward_weighted: bool) -> list[float]:
    """Per-pair loss weights. Reward-weighted: proportional to max(score, 0), mean 1 (Lee et al. 2023, eq. 2)."""
    if not reward_weighted:
        return [1.0] * len(pairs)
    clipped = [max(float(p.score), 0.0) for p in pairs]
    total = sum(clipped)
    if total == 0.0:
        logger.warning("reward-weighted loss: every score is <= 0, falling back to uniform weights")
        return [1.0] * len(pairs)
    return [c * len(pairs) / total for c in clipped]


def _validate_dpo(
    cfg: Config, pairs: list[TrainPair], preferences: list[PreferencePair] | None, reference_lora: Path | None
) -> None:
    """The inputs of objective dpo: preference pairs (no plain pairs), their images, the reference LoRA."""
    cfg.trainer.validate()  # one ConfigError for a bad objective, dpo_beta or dpo_sft_weight (or combination)
    if not preferences:
        raise ValueError("trainer.objective dpo needs at least one preference pair (winner, loser); got none")
    if pairs:
        raise ValueError("trainer.objective dpo trains on the preference pairs, not on pairs: pass pairs=[]")
    paths = [Path(path) for p in preferences for path in (p.winner_path, p.loser_path)]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise ValueError(f"preference image not found: {missing[0]} ({len(missing)} missing in total)")
    if reference_lora is not None and not Path(reference_lora).exists():
        raise ValueError(f"reference LoRA {reference_lora} does not exist")


def _validate(
    cfg: Config,
    pairs: list[TrainPair],
    preferences: list[PreferencePair] | None = None,
    reference_lora: Path | None = None,
) -> None:
    t = cfg.trainer
    if t.objective != "sft":
        _validate_dpo(cfg, pairs, preferences, reference_lora)
    elif not pairs:
        raise ValueError("train_lora needs at least one (prompt, image) pair")
    elif preferences or reference_lora is not None:
        raise ValueError("preferences and reference_lora are inputs of trainer.objective dpo (it is sft)")
    if t.prior_weight < 0:
        raise ValueError(f"trainer.prior_weight must be >= 0, got {t.prior_weight}")
    if t.prior_weight > 0:
        if not cfg.class_name:
            raise ValueError("trainer.prior_weight > 0 needs class_name (the prior images show that class)")
        if t.prior_images < 1 or not t.prior_prompts:
            raise ValueError(
                "trainer.prior_weight > 0 needs trainer.prior_images >= 1 and trainer.prior_prompts"
            )
        try:
            prior_prompts(cfg)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"trainer.prior_prompts: a template may only use the {{class_name}} placeholder ({exc!r})"
            ) from exc
    if t.max_steps is not None and t.max_steps <= 0:
        raise ValueError(f"trainer.max_steps must be > 0 or null, got {t.max_steps}")
    if t.checkpoint_every < 0:
        raise ValueError(f"trainer.checkpoint_every must be >= 0, got {t.checkpoint_every}")
    missing = [str(p.image_path) for p in pairs if not Path(p.image_path).is_file()]
    if missing:
        raise ValueError(f"training image not found: {missing[0]} ({len(missing)} missing in total)")
    # A damaged image ends here in one line naming it, not in the encoder after the models are loaded.
    images = [p.image_path for p in pairs]
    images += [path for p in preferences or [] for path in (p.winner_path, p.loser_path)]
    for path in images:
        check_image(path)


def _init_lora_hash(init_lora: Path | None) -> str | None:
    """sha256 of a LoRA folder's weights file (or of a LoRA file); None for no LoRA."""
    if init_lora is None:
        return None
    path = Path(init_lora)
    return sha256_file(path / LORA_WEIGHTS_NAME if path.is_dir() else path)


def _dpo_setup(
    preferences: list[PreferencePair],
    hashes: list[tuple[str, str]],
    reference_lora: Path | None,
    scale: float,
) -> dict[str, Any]:
    """What a DPO LoRA depends on besides the config: the pairs' prompts and image hashes, the reference."""
    reference_hash = _init_lora_hash(reference_lora)
    return {
        "preferences": [[p.prompt, w, lo] for p, (w, lo) in zip(preferences, hashes, strict=True)],
        "reference_lora": reference_hash,
        # The base model as reference has no scale.
        "reference_scale": float(scale) if reference_hash is not None else None,
    }


def _tracker_config(cfg: Config) -> dict[str, Any]:
    """Scalar trainer settings for the tracker's hyper-parameter table (it accepts no lists or None)."""
    values = {f"trainer.{k}": v for k, v in asdict(cfg.trainer).items()}
    values.update({"seed": cfg.seed, "generator.model": cfg.generator.model})
    return {k: v for k, v in values.items() if isinstance(v, (bool, int, float, str))}


class LoRATrainer:
    """One LoRA training run: ``__init__`` sets everything up, :meth:`train` runs (or resumes) it.

    ``fingerprint`` identifies the setup (see :func:`ccsr.checkpoints.fingerprint`): checkpoints and a finished
    result are trusted only under the same one.
    """

    def __init__(
        self,
        cfg: Config,
        pairs: list[TrainPair],
        out_dir: Path,
        *,
        model_path: str,
        image_hashes: list[str],
        fingerprint: str,
        init_lora: Path | None = None,
        encode_cache_dir: Path | None = None,
        prior_dir: Path | None = None,
        preferences: list[PreferencePair] | None = None,
        preference_hashes: list[tuple[str, str]] | None = None,
        reference_lora: Path | None = None,
        reference_scale: float = 1.0,
    ):
        self.started = time.perf_counter()
        self.cfg, self.t = cfg, cfg.trainer
        self.pairs, self.image_hashes = pairs, image_hashes
        self.dpo = self.t.objective == "dpo"
        self.preferences, self.preference_hashes = preferences or [], preference_hashes or []
        self.reference_lora, self.reference_scale = reference_lora, reference_scale
        self.out_dir = Path(out_dir)
        self.model_path, self.fingerprint = model_path, fingerprint
        self.encode_cache_dir = Path(encode_cache_dir) if encode_cache_dir is not None else None
        self._setup_accelerator()
        self._load_frozen_parts()
        # Drawn by the base UNet, i.e. before the LoRA is added (and before any init LoRA).
        self.prior_pairs, self.prior_hashes = self._prepare_prior(prior_dir)
        self._add_adapter(init_lora)
        self._setup_optimizer()
        # The loss terms compute_loss reports, in the order they are reduced over processes and logged.
        self.log_names = self._log_names()

    def _log_names(self) -> list[str]:
        """The objective's logged terms (see compute_loss and dpo_loss)."""
        if not self.dpo:
            return ["loss", "fidelity_loss", "prior_loss"] if self.prior_pairs else ["loss"]
        names = ["loss", "dpo_loss", "implicit_acc", "winner_loss", "winner_vs_ref"]
        if self.t.dpo_sft_weight > 0:
            names.append("sft_loss")
        return names + ["prior_loss"] if self.prior_pairs else names

    # ---- setup

    def _setup_accelerator(self) -> None:
        import torch
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, is_tensorboard_available

        device = torch_device(self.cfg)
        mixed_precision = self.t.mixed_precision
        if device.type == "cpu" and mixed_precision == "fp16":
            logger.warning("trainer.mixed_precision=fp16 needs a GPU; training in float32 on the CPU")
            mixed_precision = "no"
        # Multi-process training (accelerate launch / torchrun) goes through the same object; on a CPU-only
        # box `accelerate launch --cpu --num_processes 2` silently runs one process, while `--multi_gpu` with
        # cpu=True runs two on gloo. Gradient accumulation is done by hand (the micro-batch stream is indexed
        # by step for exact resume), so accelerate must not also divide the loss in backward().
        # TensorBoard is an optional extra: logged through accelerate's tracker only when it is importable.
        self.tracking = is_tensorboard_available()
        project = ProjectConfiguration(
            project_dir=str(self.out_dir), logging_dir=str(self.out_dir / "tensorboard")
        )
        self.accelerator = Accelerator(
            mixed_precision=mixed_precision,
            cpu=device.type == "cpu",
            log_with="tensorboard" if self.tracking else None,
            project_config=project if self.tracking else None,
        )
        self.device = self.accelerator.device
        self.num_processes = self.accelerator.num_processes
        self.process_index = self.accelerator.process_index
        self.is_main = self.accelerator.is_main_process
        dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
        self.weight_dtype = dtypes.get(self.accelerator.mixed_precision, torch.float32)

    def _load_frozen_parts(self) -> None:
        """Tokenizer, text encoder, VAE, UNet (frozen, in the mixed-precision dtype) and the noise scheduler."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel

        path, dtype = self.model_path, self.weight_dtype
        self.tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype)
        self.vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **diffusers_dtype(dtype))
        self.unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **diffusers_dtype(dtype))
        self.noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
        self.prediction_type = self.noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"{path}: unsupported scheduler prediction_type {self.prediction_type!r}")
        for module in (self.text_encoder, self.vae, self.unet):
            module.requires_grad_(False)
            module.to(self.device)
        self.text_encoder.eval()
        self.vae.eval()
        # Per-sample latent shape, for drawing the whole global batch's noise on every process.
        downscale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        side = self.t.resolution // downscale
        self.latent_shape = (self.vae.config.latent_channels, side, side)

    def _prepare_prior(self, prior_dir: Path | None) -> tuple[list[TrainPair], list[str]]:
        """The prior images (and their hashes): cached in ``prior_dir`` or drawn now; none when beta is 0."""
        if self.t.prior_weight <= 0:
            return [], []
        root = Path(prior_dir) if prior_dir is not None else self.out_dir / PRIOR_DIR
        key = prior_key(self.cfg, self.model_path, self.weight_dtype)
        # The main process draws and writes; the others wait, then load its files.
        with self.accelerator.main_process_first():
            loaded = load_prior(root, key)
            if loaded is not None:
                logger.info("reusing %d cached prior images from %s", len(loaded[0]), root)
            elif self.is_main:
                parts = (self.vae, self.text_encoder, self.tokenizer, self.unet, self.weight_dtype)
                loaded = draw_prior(self.cfg, self.model_path, root, key, *parts)
            else:
                raise RuntimeError(
                    f"process {self.process_index}: the main process left no prior images in {root}"
                )
        return loaded

    def _add_adapter(self, init_lora: Path | None) -> None:
        """A peft LoRA on the UNet's attention projections (paper: rank 4), optionally set from ``init_lora``."""
        import torch
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        t = self.t
        config = LoraConfig(
            r=t.rank, lora_alpha=t.alpha, init_lora_weights="gaussian", target_modules=list(t.target_modules)
        )
        # peft's gaussian init of lora_A draws from the global generator: seed it without disturbing the caller.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            self.unet.add_adapter(config, adapter_name=ADAPTER_NAME)
        # The adapter is made in the UNet's dtype (fp16/bf16 under mixed precision); the trainable weights are
        # float32, and become so before an init LoRA is copied in, which would otherwise be rounded to half.
        cast_training_params(self.unet, dtype=torch.float32)
        if init_lora is not None:
            _load_lora_into_adapter(self.unet, Path(init_lora), t.rank)
            logger.info("LoRA initialised from %s", init_lora)
        if t.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.unet.train()
        if self.dpo and self.reference_lora is not None:
            self._add_reference_adapter(Path(self.reference_lora))
        # A list, not a generator: clip_grad_norm_ on an exhausted iterator silently clips nothing.
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        trained = {id(p) for name, p in self.unet.named_parameters() if f".{ADAPTER_NAME}." in name}
        if {id(p) for p in self.params} != trained:
            raise RuntimeError("only the trained LoRA adapter may have trainable parameters")

    def _add_reference_adapter(self, lora: Path) -> None:
        """Diffusion-DPO's reference LoRA as a second, frozen peft adapter of the same UNet (no second UNet).

        Its scale is set the way the generator sets a LoRA's scale (diffusers' ``set_adapters``), so the
        reference is the very model the candidates were drawn with. Loading it makes it the active adapter and
        trainable: the trained adapter is made the active one again, which freezes the reference.
        """
        import torch

        folder, weight = (lora, LORA_WEIGHTS_NAME) if lora.is_dir() else (lora.parent, lora.name)
        # Nothing of the caller's generator is drawn; peft's warning about a second adapter is this design.
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            self.unet.load_lora_adapter(
                str(folder),
                weight_name=weight,
                prefix="unet",
                adapter_name=REFERENCE_ADAPTER,
                low_cpu_mem_usage=True,
            )
        self.unet.to(self.device)
        self.unet.set_adapters([REFERENCE_ADAPTER], weights=[float(self.reference_scale)])
        self.unet.set_adapter(ADAPTER_NAME)
        logger.info("DPO reference: LoRA %s at scale %g", lora, self.reference_scale)

    def _setup_optimizer(self) -> None:
        import torch
        from diffusers.optimization import get_scheduler

        t = self.t
        optimizer = torch.optim.AdamW(
            self.params, lr=t.learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8
        )
        examples = len(self.preferences) if self.dpo else len(self.pairs)
        self.batch_size = min(t.batch_size, examples)
        self.batches_per_epoch = math.ceil(examples / self.batch_size)
        self.accumulation = t.gradient_accumulation_steps
        self.total_steps = t.max_steps or math.ceil(t.epochs * self.batches_per_epoch / self.accumulation)
        self.lr_scheduler = get_scheduler(
            t.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=t.lr_warmup_steps,
            num_training_steps=self.total_steps,
        )
        # The lr scheduler is stepped by hand, once per optimizer step, so it does not depend on process count.
        # The UNet is not wrapped in DDP: gradients are summed explicitly (_all_reduce_gradients says why), and
        # every replica starts from the same weights (seeded LoRA init, same init/checkpoint files).
        self.optimizer = self.accelerator.prepare(optimizer)

    # ---- resume

    @property
    def checkpoint_root(self) -> Path:
        return self.out_dir / checkpoints.CHECKPOINTS_DIR

    def resume(self) -> tuple[int, dict | None]:
        """Load the newest valid checkpoint (if any); return (its step or 0, its state)."""
        import torch
        from peft import set_peft_model_state_dict

        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        start_step, state = 0, None
        found = checkpoints.latest_checkpoint(self.checkpoint_root, self.fingerprint)
        if found is not None:
            path, state = found
            adapter, states, rng = checkpoints.read_checkpoint(path)
            set_peft_model_state_dict(self.unet, adapter, adapter_name=ADAPTER_NAME)
            self.optimizer.load_state_dict(states["optimizer"])
            self.lr_scheduler.load_state_dict(states["lr_scheduler"])
            scaler = self._grad_scaler()
            if scaler is not None and checkpoints.GRAD_SCALER_STATE in states:
                scaler.load_state_dict(states[checkpoints.GRAD_SCALER_STATE])
            elif scaler is not None:
                logger.warning("checkpoint %s keeps no fp16 loss scale: the GradScaler starts afresh", path)
            torch.set_rng_state(rng)
            start_step = state["step"]
            logger.info("resuming LoRA training from %s (step %d of %d)", path, start_step, self.total_steps)
        self.accelerator.wait_for_everyone()  # every process has read its checkpoint before the main one prunes
        if self.is_main:
            checkpoints.rewrite_log(self.out_dir / checkpoints.TRAIN_LOG, start_step)
            checkpoints.drop_checkpoints_after(self.checkpoint_root, start_step)
        return start_step, state

    def _grad_scaler(self):
        """accelerate's GradScaler under fp16 on a GPU, else None (bf16 and float32 scale no loss)."""
        scaler = self.accelerator.scaler
        return scaler if scaler is not None and scaler.is_enabled() else None

    def _training_states(self) -> dict[str, dict]:
        """What a checkpoint keeps besides the adapter weights and the generator (see ccsr.checkpoints).

        Under fp16 also the GradScaler's loss scale and growth tracker: a resume from the initial scale would
        skip other steps on overflow, and scale the loss otherwise, than the uninterrupted run.
        """
        states = {"optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict()}
        scaler = self._grad_scaler()
        if scaler is not None:
            states[checkpoints.GRAD_SCALER_STATE] = scaler.state_dict()
        return states

    def checkpoint(self, done: int, loss: float) -> None:
        state = {
            "step": done,
            "fingerprint": self.fingerprint,
            "micro_batches_done": done * self.accumulation,
            "epoch": (done * self.accumulation) // self.batches_per_epoch,
            "batch_in_epoch": (done * self.accumulation) % self.batches_per_epoch,
            "seed": self.cfg.seed,
            "loss": loss,
        }
        checkpoints.write_checkpoint(
            self.checkpoint_root,
            done,
            _adapter_state(self.unet),
            self._training_states(),
            state,
            self.t.checkpoints_kept,
        )

    # ---- data

    def _encoding_cache(
        self, encoder: FrozenEncoder, pairs: list[TrainPair], hashes: list[str]
    ) -> EncodingCache:
        # With a cache folder the main process encodes and writes first, the others then load its files
        # (bit-identical to its in-memory tensors); without one, every process encodes for itself.
        cache_dir = self.encode_cache_dir
        with self.accelerator.main_process_first() if cache_dir is not None else nullcontext():
            return EncodingCache(
                encoder, pairs, hashes, self.t.random_flip, cache_dir, self.batch_size, write=self.is_main
            )

    def _build_streams(self, start_step: int) -> None:
        """``self.stream`` over the pairs (a :class:`PreferenceStream` over the preference pairs for objective
        dpo) and ``self.prior_stream`` over the prior images (None without them).

        The prior set runs its own epochs (its size differs from the pairs') and draws from its own generators,
        so the fidelity term's numbers are the same with and without it.
        """
        t = self.t
        encoder = FrozenEncoder(
            self.model_path,
            self.vae,
            self.text_encoder,
            self.tokenizer,
            t.resolution,
            self.device,
            self.weight_dtype,
        )
        encode_now = t.cache_latents and start_step < self.total_steps
        common = dict(
            seed=self.cfg.seed,
            batch_size=self.batch_size,
            accumulation=self.accumulation,
            trainer_cfg=t,
            num_train_timesteps=self.noise_scheduler.config.num_train_timesteps,
            latent_shape=self.latent_shape,
            encoder=encoder,
            num_processes=self.num_processes,
            process_index=self.process_index,
        )
        if self.dpo:
            self.stream = self._preference_stream(encoder, encode_now, common)
        else:
            cache = self._encoding_cache(encoder, self.pairs, self.image_hashes) if encode_now else None
            weights = _loss_weights(self.pairs, t.reward_weighted)
            self.stream = MicroBatchStream(
                "pairs", self.pairs, weights, order_key=0, draw_key=1, cache=cache, **common
            )
        self.prior_stream = None
        if self.prior_pairs:
            prior_cache = (
                self._encoding_cache(encoder, self.prior_pairs, self.prior_hashes) if encode_now else None
            )
            ones = [1.0] * len(self.prior_pairs)
            self.prior_stream = MicroBatchStream(
                "prior images", self.prior_pairs, ones, order_key=3, draw_key=4, cache=prior_cache, **common
            )

    def _preference_stream(self, encoder: FrozenEncoder, encode_now: bool, common: dict) -> PreferenceStream:
        """The preference pairs' stream; its epochs and draws have keys of their own (5 and 6)."""
        caches: tuple[EncodingCache | None, EncodingCache | None] = (None, None)
        if encode_now:
            winners, losers = zip(*(p.sides() for p in self.preferences), strict=True)
            winner_hashes, loser_hashes = zip(*self.preference_hashes, strict=True)
            caches = (
                self._encoding_cache(encoder, list(winners), list(winner_hashes)),
                self._encoding_cache(encoder, list(losers), list(loser_hashes)),
            )
        return PreferenceStream(
            "preference pairs", self.preferences, order_key=5, draw_key=6, caches=caches, **common
        )

    # ---- the objective

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
        if self.t.snr_gamma is not None:
            snr = compute_snr(scheduler, timesteps)
            weights = weights * min_snr_weight(snr, self.t.snr_gamma, self.prediction_type)
        # This process's part of the global-batch mean; summed over processes it is that mean.
        return (per_sample * weights).sum() / batch.global_size

    def compute_loss(
        self, batch: DenoisingBatch | None, prior: DenoisingBatch | None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The objective: (loss to backpropagate, its terms as floats keyed by ``self.log_names``).

        Lee et al. 2023, eq. 2: loss = fidelity + beta * (unweighted) denoising loss on the prior images. At
        least one of the two slices is non-empty. Objective dpo: :meth:`dpo_loss`.
        """
        import torch

        if self.dpo:
            return self.dpo_loss(batch, prior)
        loss = torch.zeros((), device=self.device)
        logs = dict.fromkeys(self.log_names, 0.0)
        if batch is not None:
            fidelity = self.denoising_loss(batch)
            loss = fidelity
            if self.prior_stream is not None:
                logs["fidelity_loss"] = fidelity.detach().item()
        if prior is not None:
            prior_loss = self.denoising_loss(prior)
            loss = loss + self.t.prior_weight * prior_loss
            logs["prior_loss"] = prior_loss.detach().item()
        logs["loss"] = loss.detach().item()
        return loss, logs

    @contextmanager
    def _reference_model(self):
        """The UNet as Diffusion-DPO's reference, without gradients: the base model (adapters disabled) or the
        reference LoRA alone at its scale. The trained adapter is active (and trainable) again afterwards."""
        import torch

        if self.reference_lora is None:
            self.unet.disable_adapters()
        else:
            self.unet.set_adapter(REFERENCE_ADAPTER)
        try:
            with torch.no_grad():
                yield
        finally:
            if self.reference_lora is None:
                self.unet.enable_adapters()
            else:
                self.unet.set_adapter(ADAPTER_NAME)

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
            "dpo_loss": -F.logsigmoid(self.t.dpo_beta * logits).sum() / size,
            "implicit_acc": (logits > 0).float().sum() / size,
            "winner_loss": model_w.sum() / size,
            "winner_vs_ref": (model_w - ref_w).detach().sum() / size,
        }

    def dpo_loss(
        self, batch: PreferenceBatch | None, prior: DenoisingBatch | None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Objective dpo: dpo_loss + dpo_sft_weight * winner_loss (+ prior_weight * the prior term).

        Logged: dpo_loss; implicit_acc, the share of pairs with logits > 0 (diffusers counts a tie as half; here
        it counts as a miss, so a model equal to its reference scores 0); winner_loss, the model's denoising
        loss on the winners; winner_vs_ref, that minus the reference's (rising above 0 is the warning sign that
        DPO buys the margin by making the winners worse too); sft_loss (= winner_loss) when it is weighted in.
        """
        import torch

        loss = torch.zeros((), device=self.device)
        logs = dict.fromkeys(self.log_names, 0.0)
        if batch is not None:
            terms = self.dpo_terms(batch)
            loss = terms["dpo_loss"]
            if self.t.dpo_sft_weight > 0:
                loss = loss + self.t.dpo_sft_weight * terms["winner_loss"]
                logs["sft_loss"] = terms["winner_loss"].detach().item()
            for name in ("dpo_loss", "implicit_acc", "winner_loss", "winner_vs_ref"):
                logs[name] = terms[name].detach().item()
        if prior is not None:
            prior_loss = self.denoising_loss(prior)
            loss = loss + self.t.prior_weight * prior_loss
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
            _all_reduce_gradients(self.accelerator, self.params)
            values = torch.tensor(list(totals.values()), dtype=torch.float64, device=self.device)
            totals = dict(zip(totals, self.accelerator.reduce(values).tolist(), strict=True))
        if self.t.max_grad_norm and self.t.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(self.params, self.t.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return totals

    def train(self, on_step: Callable[[int, float], None] | None = None) -> TrainResult:
        """Resume, run the remaining steps (log, checkpoint, ``on_step`` after each), save the LoRA."""
        from ccsr.console import bar

        start_step, resumed = self.resume()
        self._build_streams(start_step)
        if self.tracking:
            self.accelerator.init_trackers("lora", config=_tracker_config(self.cfg))
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
            if self.is_main and self.t.checkpoint_every and done % self.t.checkpoint_every == 0:
                if done < self.total_steps:
                    self.checkpoint(done, loss)
            if on_step is not None:
                on_step(done, loss)
        progress.close()
        if self.tracking:
            # Not accelerator.end_training(): it also destroys the process group, which the caller may reuse.
            for tracker in self.accelerator.trackers:
                tracker.finish()
        return self.save(loss)

    def _log(self, done: int, logs: dict[str, float], lr: float) -> None:
        """One line of ``train_log.jsonl`` (main process) and the tracker; with the prior term,
        loss = fidelity_loss + prior_weight * prior_loss (prior_loss unweighted)."""
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
        rank_digests = _check_ranks_in_sync(self.accelerator, self.unet) if self.num_processes > 1 else None
        seconds = time.perf_counter() - self.started
        if self.is_main:
            save_lora(self.unet, self.out_dir)
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
        logger.info(
            "LoRA trained: %d steps, final loss %.4f, %.1f s -> %s",
            self.total_steps,
            final_loss,
            seconds,
            self.out_dir,
        )
        return TrainResult(
            lora_dir=self.out_dir, steps=self.total_steps, final_loss=final_loss, seconds=seconds
        )


def train_lora(
    cfg: Config,
    pairs: list[TrainPair],
    out_dir: Path,
    init_lora: Path | None = None,
    encode_cache_dir: Path | None = None,
    on_step: Callable[[int, float], None] | None = None,
    prior_dir: Path | None = None,
    preferences: list[PreferencePair] | None = None,
    reference_lora: Path | None = None,
    reference_scale: float = 1.0,
) -> TrainResult:
    """Fine-tune a LoRA on the UNet of ``cfg.generator.model`` and write it to ``out_dir``.

    Resumes from the newest intact checkpoint in ``out_dir/checkpoints`` written for the same setup (model,
    seed, trainer settings, pairs, init LoRA); returns at once if ``out_dir`` already holds the finished
    result of that setup. ``on_step(step, loss)`` is called after every optimizer step (and its checkpoint):
    the loop uses it for progress and stop requests (an exception raised there stops training, resumable).

    With ``trainer.prior_weight`` (beta) > 0 each step also adds beta times the denoising loss on a batch of
    base-model images of ``cfg.class_name`` (prior preservation, see ``ccsr.training_data.draw_prior``), drawn
    once and cached in ``prior_dir`` (default ``out_dir/prior``); pass the same folder to several runs to share
    them.

    With ``trainer.objective: dpo`` it trains on ``preferences`` instead (Diffusion-DPO; ``pairs`` must be
    empty) against a frozen reference: the model the candidates were drawn with, i.e. the base model, or
    ``reference_lora`` at ``reference_scale``. The setup then also covers the preference images, the DPO
    settings and the reference LoRA's hash and scale.

    Under ``accelerate launch --multi_gpu --num_processes P`` (or torchrun) every process takes a contiguous
    share of each global batch of ``trainer.batch_size``, gradients are summed over processes before the
    optimizer step, and only the main process writes files (LoRA, checkpoints, logs, encoding cache); see
    docs/performance.md for what matches the single-process run exactly and what only to float rounding.
    """
    _validate(cfg, pairs, preferences, reference_lora)
    for lora in (init_lora, reference_lora):
        if lora is not None:
            check_lora(lora)
    out_dir = Path(out_dir)
    model_path = resolve_model(cfg.generator.model, cfg.model_cache)
    image_hashes = [sha256_file(Path(p.image_path)) for p in pairs]
    dpo, preference_hashes = None, None
    if cfg.trainer.objective == "dpo":
        preference_hashes = [
            (sha256_file(Path(p.winner_path)), sha256_file(Path(p.loser_path))) for p in preferences
        ]
        dpo = _dpo_setup(preferences, preference_hashes, reference_lora, reference_scale)
    setup = checkpoints.fingerprint(cfg, model_path, pairs, image_hashes, _init_lora_hash(init_lora), dpo)
    result_file = out_dir / RESULT_FILE
    if result_file.exists() and (out_dir / LORA_WEIGHTS_NAME).exists():
        done = json.loads(result_file.read_text(encoding="utf-8"))
        if done.get("fingerprint") == setup:
            logger.info("LoRA in %s is already trained for this setup; nothing to do", out_dir)
            return TrainResult(out_dir, done["steps"], done["final_loss"], done["seconds"])
    trainer = LoRATrainer(
        cfg,
        pairs,
        out_dir,
        model_path=model_path,
        image_hashes=image_hashes,
        fingerprint=setup,
        init_lora=init_lora,
        encode_cache_dir=encode_cache_dir,
        prior_dir=prior_dir,
        preferences=preferences,
        preference_hashes=preference_hashes,
        reference_lora=reference_lora,
        reference_scale=reference_scale,
    )
    return trainer.train(on_step)
