"""Export a trained LoRA to the kohya-ss / A1111 layout, for UIs that read that format.

diffusers key:  ``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora.down.weight``
kohya key:      ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_down.weight``
plus one ``<module>.alpha`` scalar per module. diffusers does the key mapping (diffusers format -> peft ->
kohya); what it leaves out is the alpha: it writes alpha = rank, while kohya's LoRA scale is ``alpha / rank``
and peft's is ``lora_alpha / r``, so we write the alpha that makes the exported file compute exactly what the
diffusers file does.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from ccsr.rundir import LORA_WEIGHTS_NAME, atomic_save_tensors

logger = logging.getLogger(__name__)

_DOWN, _UP = ".lora_A.weight", ".lora_B.weight"  # peft spellings of the two LoRA matrices


def _read_lora(source: Path) -> tuple[dict, dict]:
    """The tensors of a diffusers-format LoRA file and its UNet adapter config (peft ``LoraConfig`` fields)."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors import safe_open

    with safe_open(str(source), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    raw = json.loads(metadata.get(LORA_ADAPTER_METADATA_KEY, "{}"))
    config = {k[len("unet.") :]: v for k, v in raw.items() if k.startswith("unet.")}
    return tensors, config


def _module_alpha(module: str, rank: int, config: dict) -> float:
    """The kohya alpha that reproduces peft's scale for this module (``lora_alpha / r``, or ``/ sqrt(r)``
    with rsLoRA), with the module's alpha looked up in ``alpha_pattern`` the way peft does."""
    from peft.utils.other import get_pattern_key

    patterns = config.get("alpha_pattern") or {}
    alpha = float(patterns.get(get_pattern_key(patterns.keys(), module), config.get("lora_alpha", rank)))
    if config.get("use_rslora"):
        return alpha / math.sqrt(rank) * rank
    return alpha


def _to_kohya(source: Path, tensors: dict, config: dict) -> dict:
    import torch
    from diffusers.utils import convert_state_dict_to_kohya, convert_unet_state_dict_to_peft
    from diffusers.utils.state_dict_utils import StateDictType

    outside = [key for key in tensors if not key.startswith("unet.")]
    if outside:
        raise ValueError(f"{source}: only UNet LoRAs are exported, found {outside[0]!r}")
    peft_state = convert_unet_state_dict_to_peft(tensors)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in peft_state.items():
        if not key.endswith((_DOWN, _UP)):
            raise ValueError(f"unexpected key in LoRA file: {key!r} (expected .lora.down/.lora.up weights)")
        # One key at a time, so that each alpha diffusers adds is known to belong to this key's module.
        for kohya_key, value in convert_state_dict_to_kohya({key: tensor}, StateDictType.PEFT).items():
            if kohya_key.endswith(".alpha"):
                module = key[len("unet.") : -len(_DOWN)]
                value = torch.tensor(_module_alpha(module, tensor.shape[0], config), dtype=torch.float32)
            out[kohya_key] = value
    downs = sum(k.endswith("lora_down.weight") for k in out)
    ups = sum(k.endswith("lora_up.weight") for k in out)
    if downs == 0 or downs != ups:
        raise ValueError(f"{source}: {downs} down and {ups} up matrices; not a complete LoRA")
    return out


def export_kohya(lora_dir: Path, out_file: Path) -> Path:
    """Convert ``lora_dir/pytorch_lora_weights.safetensors`` (diffusers format) to a kohya-format file.

    ``lora_dir`` may also be the ``.safetensors`` file itself. The output is written atomically.
    """
    lora_dir = Path(lora_dir)
    source = lora_dir / LORA_WEIGHTS_NAME if lora_dir.is_dir() else lora_dir
    if not source.is_file():
        raise ValueError(f"no LoRA weights at {source}")
    tensors, config = _read_lora(source)
    if config.get("use_dora"):
        raise ValueError(f"{source}: DoRA adapters have no kohya LoRA equivalent")
    out = _to_kohya(source, tensors, config)

    ranks = {t.shape[0] for k, t in out.items() if k.endswith("lora_down.weight")}
    rank_text = str(next(iter(ranks))) if len(ranks) == 1 else "dynamic"
    alpha_text = str(float(config.get("lora_alpha", rank_text if len(ranks) == 1 else 1.0)))
    kohya_metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": rank_text,
        "ss_network_alpha": alpha_text,
        "ccsr_source": str(source),
    }
    atomic_save_tensors(out, Path(out_file), metadata=kohya_metadata)
    modules = sum(k.endswith(".alpha") for k in out)
    logger.info("exported %d LoRA modules in kohya format to %s", modules, out_file)
    return Path(out_file)
