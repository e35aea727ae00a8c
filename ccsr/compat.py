"""Differences between the library versions ccsr runs on, each decided from the installed version.

The CPU install runs transformers 5 and diffusers >= 0.40, but vLLM boxes still pin transformers 4.x, so
both sides stay supported, here and nowhere else: code elsewhere asks these functions instead of probing
objects with ``getattr``/``hasattr``/``inspect``.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, Any

from packaging.version import Version

if TYPE_CHECKING:
    import torch


@cache
def _release(package: str) -> tuple[int, ...]:
    """The installed version's release numbers: (5, 25, 0) for 5.25.0 and for 5.25.0.dev0 alike."""
    from importlib.metadata import version

    return Version(version(package)).release


def diffusers_dtype(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The dtype keyword of diffusers' ``from_pretrained`` for the installed version: ``dtype`` from 0.40 on,
    which deprecates ``torch_dtype`` (a FutureWarning on every load), ``torch_dtype`` before it."""
    return {"dtype" if _release("diffusers") >= (0, 40) else "torch_dtype": dtype}


def kv_cache_name() -> str:
    """The name of the KV cache, as a model's forward keyword and as the attribute of its output: ``cache``
    since transformers 5.24 (``past_key_values`` is deprecated there and removed in 5.40), ``past_key_values``
    before."""
    return "cache" if _release("transformers") >= (5, 24) else "past_key_values"


def pooled_output(features: Any) -> Any:
    """The features a transformers ``get_image_features``/``get_text_features`` call computed.

    transformers 5 returns an output object holding them in ``pooler_output`` (CLIP: the projected embedding;
    LLaVA-Next: one packed feature tensor per image); 4.x returns them as they are, and some 4.x LLaVA-Next
    releases pair them with a second item that is no tensor, which is dropped."""
    if _release("transformers") >= (5,):
        return features.pooler_output
    import torch

    if isinstance(features, tuple) and len(features) == 2 and not isinstance(features[1], torch.Tensor):
        return features[0]
    return features
