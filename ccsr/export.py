"""Export a trained LoRA to the kohya-ss / A1111 layout, for UIs that read that format.

diffusers key:  ``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora.down.weight``
kohya key:      ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_down.weight``
plus one ``<module>.alpha`` scalar per module. kohya trains SD 1.x/2.x on a UNet with the diffusers module
names, so the module path maps over by replacing dots with underscores; the LoRA scale it applies is
``alpha / rank``, which we write so that the exported file computes exactly what the diffusers file does.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path

logger = logging.getLogger(__name__)

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
# diffusers (and raw peft) spellings of the two LoRA matrices -> kohya's.
_SUFFIXES = {
    ".lora.down.weight": "lora_down.weight",
    ".lora.up.weight": "lora_up.weight",
    ".lora_A.weight": "lora_down.weight",
    ".lora_B.weight": "lora_up.weight",
}


def _split_key(key: str) -> tuple[str, str]:
    for suffix, kohya in _SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], kohya
    raise ValueError(f"unexpected key in LoRA file: {key!r} (expected .lora.down/.lora.up weights)")


def _adapter_metadata(metadata: dict[str, str] | None) -> dict:
    """The peft LoraConfig that diffusers stores in the file's metadata, keys without the ``unet.`` prefix."""
    if not metadata or "lora_adapter_metadata" not in metadata:
        return {}
    raw = json.loads(metadata["lora_adapter_metadata"])
    return {k[len("unet.") :]: v for k, v in raw.items() if k.startswith("unet.")}


def _module_alpha(module: str, rank: int, config: dict) -> float:
    """The kohya alpha that reproduces peft's scale for this module (alpha / rank, or alpha / sqrt(rank))."""
    alpha = float(config.get("lora_alpha", rank))
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.search(rf"(^|\.){re.escape(pattern)}$", module) or re.fullmatch(pattern, module):
            alpha = float(value)
    if config.get("use_rslora"):
        return alpha / math.sqrt(rank) * rank
    return alpha


def export_kohya(lora_dir: Path, out_file: Path) -> Path:
    """Convert ``lora_dir/pytorch_lora_weights.safetensors`` (diffusers format) to a kohya-format file.

    ``lora_dir`` may also be the ``.safetensors`` file itself. The output is written atomically.
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    lora_dir = Path(lora_dir)
    source = lora_dir / LORA_WEIGHTS_NAME if lora_dir.is_dir() else lora_dir
    if not source.is_file():
        raise ValueError(f"no LoRA weights at {source}")
    with safe_open(str(source), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    config = _adapter_metadata(metadata)
    if config.get("use_dora"):
        raise ValueError(f"{source}: DoRA adapters have no kohya LoRA equivalent")

    out: dict[str, torch.Tensor] = {}
    ranks: set[int] = set()
    for key, tensor in tensors.items():
        if not key.startswith("unet."):
            raise ValueError(f"{source}: only UNet LoRAs are exported, found {key!r}")
        module, kohya_suffix = _split_key(key[len("unet.") :])
        name = "lora_unet_" + module.replace(".", "_")
        out[f"{name}.{kohya_suffix}"] = tensor.contiguous()
        if kohya_suffix == "lora_down.weight":
            rank = tensor.shape[0]
            ranks.add(rank)
            out[f"{name}.alpha"] = torch.tensor(_module_alpha(module, rank, config), dtype=torch.float32)
    downs = sum(k.endswith("lora_down.weight") for k in out)
    ups = sum(k.endswith("lora_up.weight") for k in out)
    if downs == 0 or downs != ups:
        raise ValueError(f"{source}: {downs} down and {ups} up matrices; not a complete LoRA")

    rank_text = str(next(iter(ranks))) if len(ranks) == 1 else "dynamic"
    alpha_text = str(float(config.get("lora_alpha", rank_text if len(ranks) == 1 else 1.0)))
    kohya_metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": rank_text,
        "ss_network_alpha": alpha_text,
        "ccsr_source": str(source),
    }
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.tmp{os.getpid()}")
    save_file(out, str(tmp), metadata=kohya_metadata)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, out_file)
    logger.info("exported %d LoRA modules in kohya format to %s", downs, out_file)
    return out_file
