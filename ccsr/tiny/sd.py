"""Tiny Stable Diffusion 2.x: the real pipeline classes at toy size, random weights, built offline.

Same layout as ``stabilityai/stable-diffusion-2-1-base`` (CLIP text encoder, UNet2DConditionModel with
cross-attention and linear projections, an AutoencoderKL that downsamples by 8, a DDIM scheduler with the
scaled-linear 0.00085-0.012 betas) so that generation, LoRA training and LoRA loading run the same code as
on a GPU box. Images are noise-like; they exist to exercise the loop, not to look like anything.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

logger = logging.getLogger(__name__)

CLIP_MAX_LENGTH = 77  # CLIP's text context length, as in every SD text encoder
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def byte_chars() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for the bytes 0-255 (GPT-2 / CLIP convention)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def build_clip_tokenizer(out_dir: Path | None = None) -> CLIPTokenizer:
    """A CLIPTokenizer with a character-level vocab: 256 byte chars, the same with "</w>", BOS and EOS.

    No merges, so every word is spelled out character by character (514 tokens, like the real vocab's first
    512 entries). Any text tokenizes; only the vocabulary size differs from the 49,408 of the real one.
    """
    from transformers import CLIPTokenizer

    chars = byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_LENGTH)
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def tiny_clip_text_config(vocab_size: int, projection_dim: int = 512):
    from transformers import CLIPTextConfig

    tokenizer_ids = {
        "bos_token_id": vocab_size - 2,
        "eos_token_id": vocab_size - 1,
        "pad_token_id": vocab_size - 1,
    }
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=projection_dim,
        hidden_act="gelu",  # SD 2.x's OpenCLIP ViT-H text tower uses gelu, not quick_gelu
        **tokenizer_ids,
    )


def build_stable_diffusion(out_dir: Path, seed: int = 0, prediction_type: str = "epsilon") -> None:
    """Write a loadable tiny ``StableDiffusionPipeline`` (safetensors) to ``out_dir``.

    ``prediction_type`` "v_prediction" gives the SD 2.1 (768 px) flavour, so training code can be tested
    against both objectives.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = build_clip_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64,  # latent size of a 512 px image, as in SD 2.1-base
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        in_channels=4,
        out_channels=4,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        block_out_channels=(16, 16, 32, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=512,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(tiny_clip_text_config(len(tokenizer)))
    save_sd2_pipeline(out_dir, vae, text_encoder, tokenizer, unet, prediction_type)


def sd2_scheduler(prediction_type: str = "epsilon", zero_terminal_snr: bool = False):
    """SD 2.x's DDIM scheduler (scaled_linear 0.00085-0.012). ``zero_terminal_snr`` rescales the betas so the
    last timestep is pure noise and samples from it (Lin et al. 2024, "Common Diffusion Noise Schedules and
    Sample Steps are Flawed"; needs v-prediction)."""
    from diffusers import DDIMScheduler

    extra = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"} if zero_terminal_snr else {}
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
        **extra,
    )


def save_sd2_pipeline(
    out_dir,
    vae,
    text_encoder,
    tokenizer,
    unet,
    prediction_type: str = "epsilon",
    zero_terminal_snr: bool = False,
) -> None:
    """Assemble an SD 2.x-style pipeline (see ``sd2_scheduler``) and save it as safetensors."""
    from diffusers import StableDiffusionPipeline

    scheduler = sd2_scheduler(prediction_type, zero_terminal_snr)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
