"""Checks of files handed to ccsr from outside its own run bookkeeping: a LoRA, a training image.

Each check is cheap and runs before any model is loaded: a LoRA is judged from its safetensors header, its
tensors (diffusers reads them the way ``load_lora_weights`` does, kohya layout included) and, when the
target model is known, the layer names and shapes of that model's UNet, built from its config on the meta
device (no weights). A problem raises ``InputError`` whose message starts with the file's path, says what is
wrong and what to do; the command line prints it as one line (exit code 2).

No hub library is imported at module level (see ``ccsr.cli``).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from ccsr.rundir import LORA_WEIGHTS_NAME

logger = logging.getLogger(__name__)

# The peft names of a LoRA layer's two matrices, after diffusers' conversion of any layout it reads.
_DOWN, _UP = ".lora_A.weight", ".lora_B.weight"


class InputError(ValueError):
    """A file given to ccsr cannot be used; the message reads ``<path>: <what is wrong>; <what to do>``."""


@dataclass(frozen=True)
class LoraInfo:
    path: Path  # the weights file
    kohya: bool  # written in the kohya-ss layout (lora_unet_... keys)


def lora_weights_file(path: str | Path) -> Path:
    """The weights file of a LoRA folder (``pytorch_lora_weights.safetensors``) or the file itself."""
    path = Path(path)
    if path.is_dir():
        if not (path / LORA_WEIGHTS_NAME).is_file():
            raise InputError(
                f"{path}: no {LORA_WEIGHTS_NAME} in this folder; give a trained LoRA folder or a LoRA "
                ".safetensors file"
            )
        return path / LORA_WEIGHTS_NAME
    if not path.exists():
        raise InputError(
            f"{path}: no such file or folder; give a LoRA folder (holding {LORA_WEIGHTS_NAME}) or a LoRA "
            ".safetensors file"
        )
    return path


def _tensor_names(file: Path) -> list[str]:
    """The names in a safetensors header. Opening checks the header and that the file holds every byte the
    header declares, so a truncated file fails here without reading its tensors."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as exc:
        raise InputError(
            f"{file}: not a readable safetensors file ({exc}); it is truncated or corrupt, replace it"
        ) from None


def _unet_part(file: Path, names: list[str]) -> dict:
    """The LoRA's UNet tensors in peft naming (``<layer>.lora_A.weight``), read by diffusers; ``names`` (the
    file's own tensor names) only name an offending tensor as the file spells it."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft

    try:
        state, _alphas = StableDiffusionPipeline.lora_state_dict(str(file.parent), weight_name=file.name)
    except Exception as exc:  # noqa: BLE001 - diffusers' layout conversions raise many kinds; all mean "unusable"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{file}: diffusers cannot read it as a LoRA ({reason}); give a LoRA file") from None
    unet = {k[len("unet.") :]: v for k, v in state.items() if k.startswith("unet.")}
    other = [k for k in state if not k.startswith(("unet.", "text_encoder"))]
    if other:
        mine = [n for n in names if not n.startswith(("unet.", "lora_unet_", "text_encoder", "lora_te"))]
        first = (mine or other)[0]
        raise InputError(f"{file}: {first!r} is not a LoRA weight; give a LoRA file, not a model checkpoint")
    if len(unet) < len(state):
        mine = [n for n in names if n.startswith(("text_encoder", "lora_te"))]
        first = (mine or [k for k in state if not k.startswith("unet.")])[0]
        sdxl = " of an SDXL LoRA" if first.startswith(("text_encoder_2.", "lora_te2_")) else ""
        what = "holds text-encoder weights" if unet else "holds no UNet weights, only text-encoder ones"
        raise InputError(
            f"{file}: {what}{sdxl} such as {first!r}; ccsr applies UNet-only LoRAs (as it trains them)"
        )
    return convert_unet_state_dict_to_peft(unet)


def _layers(file: Path, peft_state: dict) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Each adapted layer's (down, up) matrix shapes; both must be there, finite, and fit together."""
    import torch

    found: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, tensor in peft_state.items():
        suffix = next((s for s in (_DOWN, _UP) if key.endswith(s)), None)
        if suffix is None:
            raise InputError(
                f"{file}: unexpected tensor {key!r}; ccsr reads plain LoRAs (down and up matrices per layer)"
            )
        layer, part = key[: -len(suffix)], "down" if suffix == _DOWN else "up"
        if not bool(torch.isfinite(tensor).all()):
            raise InputError(
                f"{file}: layer {layer}: the {part} matrix holds NaN or infinite values; replace it"
            )
        found.setdefault(layer, {})[part] = tuple(tensor.shape)
    layers = {}
    for layer, parts in found.items():
        for part in ("down", "up"):
            if part not in parts:
                raise InputError(f"{file}: layer {layer} has no {part} matrix; the file is incomplete")
        down, up = parts["down"], parts["up"]
        if len(down) not in (2, 4) or len(up) != len(down) or down[0] != up[1]:
            raise InputError(
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
            raise InputError(
                f"{file}: adapts layer {layer}, which the UNet of {model} does not have: a LoRA for another "
                f"model (such as SDXL); give a LoRA trained on {model}"
            )
        # Linear (out, in): down (r, in), up (out, r). Conv2d (out, in, kh, kw): down (r, in, kh, kw).
        fits = len(down) == len(weight) and down[1] == weight[1] and up[0] == weight[0]
        if fits and len(weight) == 4:
            fits = down[2:] == weight[2:]
        if not fits:
            raise InputError(
                f"{file}: layer {layer} maps {down[1]} to {up[0]} features, but in {model} it maps "
                f"{weight[1]} to {weight[0]}: a LoRA for another model; give a LoRA trained on {model}"
            )


def check_lora(path: str | Path, model: str | None = None, model_cache: str | None = None) -> LoraInfo:
    """Check a LoRA folder or file without loading a model; with ``model`` (a config's generator.model)
    also that its layers exist in that model's UNet with the same shapes. Raises InputError."""
    file = lora_weights_file(path)
    names = _tensor_names(file)
    if not names:
        raise InputError(f"{file}: holds no tensors, so it is not a LoRA; give a trained LoRA")
    layers = _layers(file, _unet_part(file, names))
    if model is not None:
        targets = unet_layers(model, model_cache)
        if targets is not None:
            _match(file, layers, targets, model)
    return LoraInfo(path=file, kohya=any(n.startswith("lora_unet_") for n in names))


def _pil_open():
    """PIL's own ``Image.open``. Importing ultralytics (the detector) replaces it with a wrapper that, for a
    file PIL cannot identify, first installs (pip, when online) and imports a HEIF plugin; a file that is no
    image must simply fail."""
    from PIL import Image

    return getattr(sys.modules.get("ultralytics.utils.patches"), "_image_open", Image.open)


def check_image(path: str | Path) -> None:
    """An image file PIL can open whose data is complete (``verify`` reads it through without decoding)."""
    from PIL import Image

    try:
        with _pil_open()(path) as image:
            image.verify()
    except ImportError:  # the wrapper above, should its original not be found: it ends here for a non-image
        raise InputError(
            f"{path}: not a readable image (cannot identify it); restore or replace it"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        # PIL reports a broken PNG chunk as SyntaxError; a non-image is UnidentifiedImageError (an OSError).
        raise InputError(f"{path}: not a readable image ({exc}); restore or replace it") from None
