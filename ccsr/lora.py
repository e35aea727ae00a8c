"""The LoRA file format, in one place: where a LoRA's weights are, how they are checked, read, loaded into
a UNet, saved, and exported for other tools.

ccsr trains UNet-only LoRAs and writes them in diffusers' format: a folder holding
``pytorch_lora_weights.safetensors`` (``unet.<layer>.lora.down/up.weight`` tensors, the peft adapter config in
the file's metadata). Wherever a LoRA is given, a folder of that kind or a ``.safetensors`` file itself is
taken (:func:`weights_file`), kohya-ss layout included: diffusers reads it the way ``load_lora_weights`` does.

:func:`check` judges a LoRA before any model is loaded: from its safetensors header, its tensors and, when the
target model is known, the layer names and shapes of that model's UNet built from its config on the meta
device (no weights). A problem raises ``UserError`` whose message starts with the file's path, says what is
wrong and what to do; the command line prints it as one line (exit code 2).

No hub library is imported at module level (see ``ccsr.cli``).
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ccsr.inputs import UserError
from ccsr.rundir import LORA_WEIGHTS_NAME, atomic_path, atomic_save_tensors, sha256_file

if TYPE_CHECKING:
    import torch

__all__ = [
    "ADAPTER_NAME",
    "LORA_WEIGHTS_NAME",
    "REFERENCE_ADAPTER",
    "LoraInfo",
    "adapter_state",
    "add_frozen_adapter",
    "check",
    "export_kohya",
    "load_into",
    "save",
    "unet_layers",
    "unet_state",
    "weights_file",
    "weights_hash",
]

logger = logging.getLogger(__name__)

ADAPTER_NAME = "default"  # the trained adapter: the one peft makes, the one saved
REFERENCE_ADAPTER = "reference"  # Diffusion-DPO's reference LoRA: a second adapter, frozen, never saved
# The peft names of a LoRA layer's two matrices, after diffusers' conversion of any layout it reads.
_DOWN, _UP = ".lora_A.weight", ".lora_B.weight"


def weights_file(path: str | Path) -> Path:
    """The weights file of a LoRA folder (``pytorch_lora_weights.safetensors``) or the file itself."""
    path = Path(path)
    if path.is_dir():
        if not (path / LORA_WEIGHTS_NAME).is_file():
            raise UserError(
                f"{path}: no {LORA_WEIGHTS_NAME} in this folder; give a trained LoRA folder or a LoRA "
                ".safetensors file"
            )
        return path / LORA_WEIGHTS_NAME
    if not path.exists():
        raise UserError(
            f"{path}: no such file or folder; give a LoRA folder (holding {LORA_WEIGHTS_NAME}) or a LoRA "
            ".safetensors file"
        )
    return path


def weights_hash(path: str | Path | None) -> str | None:
    """sha256 of a LoRA's weights file (folder or file); None for no LoRA."""
    return None if path is None else sha256_file(weights_file(path))


# --------------------------------------------------------------------------------------------------------------
# reading and checking


def _tensor_names(file: Path) -> list[str]:
    """The names in a safetensors header. Opening checks the header and that the file holds every byte the
    header declares, so a truncated file fails here without reading its tensors."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as exc:
        raise UserError(
            f"{file}: not a readable safetensors file ({exc}); it is truncated or corrupt, replace it"
        ) from None


def _unet_part(file: Path, names: list[str]) -> tuple[dict, dict | None]:
    """The LoRA's UNet tensors in peft naming (``<layer>.lora_A.weight``), read by diffusers, and the kohya
    alphas it carries (None for a diffusers file); ``names`` (the file's own tensor names) only name an
    offending tensor as the file spells it."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft

    try:
        state, alphas = StableDiffusionPipeline.lora_state_dict(str(file.parent), weight_name=file.name)
    except Exception as exc:  # noqa: BLE001 - diffusers' layout conversions raise many kinds; all mean "unusable"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{file}: diffusers cannot read it as a LoRA ({reason}); give a LoRA file") from None
    unet = {k[len("unet.") :]: v for k, v in state.items() if k.startswith("unet.")}
    other = [k for k in state if not k.startswith(("unet.", "text_encoder"))]
    if other:
        mine = [n for n in names if not n.startswith(("unet.", "lora_unet_", "text_encoder", "lora_te"))]
        first = (mine or other)[0]
        raise UserError(f"{file}: {first!r} is not a LoRA weight; give a LoRA file, not a model checkpoint")
    if len(unet) < len(state):
        mine = [n for n in names if n.startswith(("text_encoder", "lora_te"))]
        first = (mine or [k for k in state if not k.startswith("unet.")])[0]
        sdxl = " of an SDXL LoRA" if first.startswith(("text_encoder_2.", "lora_te2_")) else ""
        what = "holds text-encoder weights" if unet else "holds no UNet weights, only text-encoder ones"
        raise UserError(
            f"{file}: {what}{sdxl} such as {first!r}; ccsr applies UNet-only LoRAs (as it trains them)"
        )
    return convert_unet_state_dict_to_peft(unet), alphas


def unet_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """A LoRA's UNet tensors in peft naming and its kohya alphas (None for a diffusers file). Raises
    UserError for a file that is no UNet-only LoRA."""
    file = weights_file(path)
    return _unet_part(file, _tensor_names(file))


def _layers(file: Path, peft_state: dict) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Each adapted layer's (down, up) matrix shapes; both must be there, finite, and fit together."""
    import torch

    found: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, tensor in peft_state.items():
        suffix = next((s for s in (_DOWN, _UP) if key.endswith(s)), None)
        if suffix is None:
            raise UserError(
                f"{file}: unexpected tensor {key!r}; ccsr reads plain LoRAs (down and up matrices per layer)"
            )
        layer, part = key[: -len(suffix)], "down" if suffix == _DOWN else "up"
        if not bool(torch.isfinite(tensor).all()):
            raise UserError(
                f"{file}: layer {layer}: the {part} matrix holds NaN or infinite values; replace it"
            )
        found.setdefault(layer, {})[part] = tuple(tensor.shape)
    layers = {}
    for layer, parts in found.items():
        for part in ("down", "up"):
            if part not in parts:
                raise UserError(f"{file}: layer {layer} has no {part} matrix; the file is incomplete")
        down, up = parts["down"], parts["up"]
        if len(down) not in (2, 4) or len(up) != len(down) or down[0] != up[1]:
            raise UserError(
                f"{file}: layer {layer}: down matrix {list(down)} and up matrix {list(up)} do not fit "
                "together; the file is corrupt"
            )
        layers[layer] = (down, up)
    return layers


def unet_layers(model: str, model_cache: str | None = None) -> dict[str, tuple[int, ...]] | None:
    """Weight shape of every linear and convolution layer of ``model``'s UNet (a diffusers Stable Diffusion
    folder, hub id or embedded name), from its config alone. None when the config cannot be read here (a hub
    id not in the local cache) or is not a ``UNet2DConditionModel``: diffusers then checks when it loads."""
    import torch
    from diffusers import UNet2DConditionModel

    from ccsr.models import resolve_model

    path = resolve_model(model, model_cache)
    try:
        config = UNet2DConditionModel.load_config(path, subfolder="unet")
    except (OSError, ValueError):
        logger.debug("no UNet config for %s; the LoRA's layers are checked when it is loaded", model)
        return None
    if config.get("_class_name") != "UNet2DConditionModel":
        return None
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    kinds = (torch.nn.Linear, torch.nn.Conv2d)
    return {name: tuple(m.weight.shape) for name, m in unet.named_modules() if isinstance(m, kinds)}


def _match(file: Path, layers: dict, targets: dict[str, tuple[int, ...]], model: str) -> None:
    for layer, (down, up) in layers.items():
        weight = targets.get(layer)
        if weight is None:
            raise UserError(
                f"{file}: adapts layer {layer}, which the UNet of {model} does not have: a LoRA for another "
                f"model (such as SDXL); give a LoRA trained on {model}"
            )
        # Linear (out, in): down (r, in), up (out, r). Conv2d (out, in, kh, kw): down (r, in, kh, kw).
        fits = len(down) == len(weight) and down[1] == weight[1] and up[0] == weight[0]
        if fits and len(weight) == 4:
            fits = down[2:] == weight[2:]
        if not fits:
            raise UserError(
                f"{file}: layer {layer} maps {down[1]} to {up[0]} features, but in {model} it maps "
                f"{weight[1]} to {weight[0]}: a LoRA for another model; give a LoRA trained on {model}"
            )


@dataclass(frozen=True)
class LoraInfo:
    path: Path  # the weights file
    kohya: bool  # written in the kohya-ss layout (lora_unet_... keys)


def check(path: str | Path, model: str | None = None, model_cache: str | None = None) -> LoraInfo:
    """Check a LoRA folder or file without loading a model; with ``model`` (a config's generator.model)
    also that its layers exist in that model's UNet with the same shapes. Raises UserError."""
    file = weights_file(path)
    names = _tensor_names(file)
    if not names:
        raise UserError(f"{file}: holds no tensors, so it is not a LoRA; give a trained LoRA")
    peft_state, _alphas = _unet_part(file, names)
    layers = _layers(file, peft_state)
    if model is not None:
        targets = unet_layers(model, model_cache)
        if targets is not None:
            _match(file, layers, targets, model)
    return LoraInfo(path=file, kohya=any(n.startswith("lora_unet_") for n in names))


# --------------------------------------------------------------------------------------------------------------
# into and out of a UNet's peft adapters


def check_rank(path: str | Path, rank: int) -> None:
    """A LoRA to continue training from must have the trainer's rank; raises UserError naming both."""
    peft_state, _alphas = unet_state(path)
    ranks = sorted({v.shape[0] for k, v in peft_state.items() if ".lora_A." in k})
    if ranks != [rank]:
        raise UserError(
            f"{weights_file(path)}: this LoRA has rank {', '.join(map(str, ranks))} but trainer.rank is {rank}; "
            "set trainer.rank to match, or trainer.init_from: fresh"
        )


def load_into(unet, path: str | Path, rank: int) -> None:
    """Set the trained adapter's weights (already made with ``rank``) from a LoRA folder or file.

    The values are copied into the existing adapter, in its (float32) dtype, so they arrive exactly; kohya
    alphas are ignored: the adapter keeps its own ``lora_alpha`` (``trainer.alpha``).
    """
    from peft import set_peft_model_state_dict

    peft_state, alphas = unet_state(path)
    if alphas:
        logger.warning("init LoRA %s carries kohya alphas; they are ignored (trainer.alpha is used)", path)
    ranks = {v.shape[0] for k, v in peft_state.items() if ".lora_A." in k}
    if ranks != {rank}:
        raise ValueError(f"init LoRA {path} has rank {sorted(ranks)}, but trainer.rank is {rank}")
    result = set_peft_model_state_dict(unet, peft_state, adapter_name=ADAPTER_NAME)
    unexpected = getattr(result, "unexpected_keys", [])
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if unexpected or missing:
        raise ValueError(
            f"init LoRA {path} does not match trainer.target_modules "
            f"({len(unexpected)} unexpected, {len(missing)} missing keys, e.g. {(unexpected + missing)[0]})"
        )


def add_frozen_adapter(unet, path: str | Path, name: str, scale: float, device: torch.device) -> None:
    """A LoRA as a second, never trained adapter ``name`` of the same UNet, at ``scale``.

    The scale is set the way the generator sets a LoRA's (diffusers' ``set_adapters``), so the adapter makes
    the very model the generator drew with. Loading makes it the active adapter and trainable: the trained
    adapter is made the active one again, which freezes this one.
    """
    import torch

    file = weights_file(path)
    # Nothing of the caller's generator is drawn; peft's warning about a second adapter is this design.
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        unet.load_lora_adapter(
            str(file.parent), weight_name=file.name, prefix="unet", adapter_name=name, low_cpu_mem_usage=True
        )
    unet.to(device)
    unet.set_adapters([name], weights=[float(scale)])
    unet.set_adapter(ADAPTER_NAME)


def adapter_state(unet) -> dict[str, torch.Tensor]:
    """The trained adapter's tensors (peft names), float32 copies on the CPU."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(unet).items()}


def save(unet, out_dir: Path) -> Path:
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
# kohya-ss / A1111 export
#
# diffusers key:  ``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora.down.weight``
# kohya key:      ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_down.weight``
# plus one ``<module>.alpha`` scalar per module. diffusers does the key mapping (diffusers format -> peft ->
# kohya); what it leaves out is the alpha: it writes alpha = rank, while kohya's LoRA scale is ``alpha / rank``
# and peft's is ``lora_alpha / r``, so we write the alpha that makes the exported file compute exactly what the
# diffusers file does.


def _read_diffusers_file(source: Path) -> tuple[dict, dict]:
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


def export_kohya(lora: Path, out_file: Path) -> Path:
    """Convert a diffusers-format LoRA (folder or file) to a kohya-format file, written atomically."""
    source = weights_file(lora)
    tensors, config = _read_diffusers_file(source)
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
