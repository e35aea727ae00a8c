"""Seeded random streams: every random number a run draws follows from ``cfg.seed`` and a key that names
what it is for, so a resumed or re-sharded run draws exactly what the uninterrupted one-process run drew.

The loop's draws take a seed from ``derive_seed(seed, purpose, ...)`` (a candidate image:
``("candidate", k, prompt_id, j)``; an evaluation image: ``("eval", ...)``; the paired gate's bootstrap of
iteration k: ``("gate", k)``); the trainer's come from
``seeded_generator`` with the stream keys below.

A generator is seeded by ``(seed, stream, *position)``: the stream keys below, then where in the stream the
draw is (an epoch; an optimizer step and micro-batch; an image index). The numbers are part of the
reproducibility contract (changing one changes every LoRA trained since): new streams get new numbers.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# The training pairs: the data order of epoch e is (seed, PAIRS_ORDER, e); the draws (flip, latent sample,
# noise, timestep) of micro-batch m of optimizer step s are (seed, PAIRS_DRAWS, s, m).
PAIRS_ORDER = 0
PAIRS_DRAWS = 1
# Prior image i is drawn by the base model from (seed, PRIOR_IMAGE, i), whatever the batch size.
PRIOR_IMAGE = 2
# The prior images as training data: their own epochs and draws, so the fidelity term's numbers are the same
# with and without the prior term.
PRIOR_ORDER = 3
PRIOR_DRAWS = 4
# The Diffusion-DPO preference pairs: their own epochs and draws.
PREFERENCES_ORDER = 5
PREFERENCES_DRAWS = 6


def seeded_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator for one (seed, keys) tuple; CPU so the draws are the same on every device."""
    import numpy as np
    import torch

    state = np.random.SeedSequence([seed % 2**63, *keys]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) % 2**63)


def derive_seed(base: int, *parts: Any) -> int:
    """A stable 31-bit seed for one purpose, so every random draw of a run follows from ``cfg.seed``."""
    text = ":".join(str(p) for p in (base, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") & 0x7FFFFFFF
