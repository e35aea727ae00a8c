"""The trainer's micro-batches: which examples each one holds, its random draws, and this process's slice of
it, encoded.

Micro-batch ``m = step * accumulation + micro`` of a data set is a slice of its epoch's permutation. Epoch
``e``'s order comes from the generator ``(seed, order_key, e)`` and the draws of micro-batch ``micro`` of step
``step`` from ``(seed, draw_key, step, micro)`` (the keys are named in :mod:`ccsr.seeds`), so a resumed run
draws exactly what the uninterrupted run drew. The draws are made over the whole global batch on every
process, each then keeping its slice: a sample gets the same flip, latent draw, noise and timestep whatever
the process count, and the cached and uncached paths consume identical random numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ccsr.distributed import shard
from ccsr.seeds import seeded_generator

if TYPE_CHECKING:
    import torch

    from ccsr.config import TrainerConfig
    from ccsr.training_data import EncodingCache, FrozenEncoder, PreferencePair, TrainPair


def epoch_layout(examples: int, batch_size: int) -> tuple[int, int]:
    """(global batch size, batches per epoch) of a data set of ``examples``: a set smaller than the batch
    is one batch of itself, the last batch of an epoch may be short."""
    size = min(batch_size, examples)
    return size, math.ceil(examples / size)


@dataclass
class Draws:
    """The random numbers of one global micro-batch of ``size``, drawn in this fixed order: flips, one latent
    sample per image of an example (``latents``: one for a pair, winner's then loser's for a preference pair),
    noise, noise offset, timesteps."""

    flips: list[bool]
    latents: list[torch.Tensor]
    noise: torch.Tensor
    timesteps: torch.Tensor

    def shard(self, lo: int, hi: int) -> Draws:
        """The draws of samples [lo, hi)."""
        return Draws(
            self.flips[lo:hi], [x[lo:hi] for x in self.latents], self.noise[lo:hi], self.timesteps[lo:hi]
        )


@dataclass
class DenoisingBatch:
    """This process's slice of one global micro-batch, with everything the denoising loss needs.

    ``latent_mean``/``latent_std`` are the VAE's distribution of each (flipped where drawn) image and ``text``
    the caption embeddings (CPU, float32); ``latent_draw``, ``noise``, ``timesteps`` and ``weights`` are this
    slice's share of the global batch's draws; ``global_size`` is the global batch size the loss divides by.
    """

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
    """Micro-batches of one data set of (prompt, image) pairs: its epoch permutations, its random draws, and
    this process's slice, encoded (from ``cache`` when there is one)."""

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
        self.batch_size, self.batches_per_epoch = epoch_layout(len(pairs), batch_size)
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

    def draws(self, step: int, micro: int, size: int, latent_samples: int) -> Draws:
        """The draws of micro-batch ``micro`` of step ``step`` (global size ``size``), in the fixed order."""
        import torch

        g = seeded_generator(self.seed, self.draw_key, step, micro)
        shape = self.latent_shape
        flips = (torch.rand(size, generator=g) < 0.5).tolist() if self.random_flip else [False] * size
        latents = [torch.randn((size, *shape), generator=g) for _ in range(latent_samples)]
        noise = torch.randn((size, *shape), generator=g)
        if self.noise_offset:
            noise = noise + self.noise_offset * torch.randn((size, shape[0], 1, 1), generator=g)
        timesteps = torch.randint(0, self.num_train_timesteps, (size,), generator=g)
        return Draws(flips, latents, noise, timesteps)

    def _my_share(self, step: int, micro: int, latent_samples: int) -> tuple[list[int], Draws, int] | None:
        """(this process's indices, their draws, the global batch size) of a micro-batch; None if empty."""
        indices = self.indices(step * self.accumulation + micro)
        size = len(indices)
        drawn = self.draws(step, micro, size, latent_samples)
        lo, hi = shard(size, self.num_processes, self.process_index)
        if lo == hi:
            return None
        return indices[lo:hi], drawn.shard(lo, hi), size

    def batch(self, step: int, micro: int) -> DenoisingBatch | None:
        """This process's slice of micro-batch ``micro`` of optimizer step ``step``; None if the slice is empty."""
        share = self._my_share(step, micro, latent_samples=1)
        if share is None:
            return None
        mine, drawn, size = share
        return self._encode(self.pairs, self.cache, mine, drawn, drawn.latents[0], size)

    def _encode(
        self,
        pairs: list[TrainPair],
        cache: EncodingCache | None,
        mine: list[int],
        drawn: Draws,
        latent_draw: torch.Tensor,
        global_size: int,
    ) -> DenoisingBatch:
        """The samples ``mine`` of ``pairs`` encoded (from ``cache`` when there is one), with their draws."""
        if cache is not None:
            mean, std, text = cache.batch(mine, drawn.flips)
        else:
            mean, std = self.encoder.latent_distribution([pairs[i].image_path for i in mine], drawn.flips)
            text = self.encoder.text_embeddings([pairs[i].prompt for i in mine])
        if tuple(mean.shape[1:]) != self.latent_shape:
            raise RuntimeError(
                f"VAE latents of the {self.name} are {tuple(mean.shape[1:])}, expected {self.latent_shape}"
            )
        return DenoisingBatch(
            indices=mine,
            latent_mean=mean,
            latent_std=std,
            text=text,
            latent_draw=latent_draw,
            noise=drawn.noise,
            timesteps=drawn.timesteps,
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
    :class:`MicroBatchStream` over the preference pairs, with two latent samples per pair (the winner's, then
    the loser's). A pair's two images share the flip, the noise and the timestep, so the loss difference
    between them measures the images, not the draws (Wallace et al. 2023; diffusers' train_diffusion_dpo.py
    does the same).
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

    def batch(self, step: int, micro: int) -> PreferenceBatch | None:
        """This process's slice of micro-batch ``micro`` of optimizer step ``step``; None if the slice is empty."""
        share = self._my_share(step, micro, latent_samples=2)
        if share is None:
            return None
        mine, drawn, size = share
        winner_draw, loser_draw = drawn.latents
        return PreferenceBatch(
            winner=self._encode(self.pairs, self.cache, mine, drawn, winner_draw, size),
            loser=self._encode(self.losers, self.loser_cache, mine, drawn, loser_draw, size),
        )
