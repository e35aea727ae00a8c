"""Random-weight models at the paper's real sizes, for ``python -m benchmarks.gpu_check`` (no download).

Every role of ``configs/paper.yaml`` is built from the architecture hyper-parameters below (hidden sizes,
layer counts, heads, vocabulary sizes of the public model configs), with random weights, and saved in the
layout its loader expects (safetensors for the transformers and diffusers models, ultralytics' ``.pt`` for
YOLO-World). Random weights cost the same FLOPs and memory as trained ones, so timings and peak memory measured
with them are those of the real models; what they draw and answer means nothing.

Tokenizers are the project's offline ones (``ccsr.tiny.tokenizer``, ``ccsr.tiny.sd``): not the real
vocabularies, but every id they produce lies inside the model's vocabulary, and text length in tokens is of the
same order. The prompter's generation config suppresses the ids past its tokenizer's vocabulary, which the
tokenizer could not decode. ``paper_model`` builds a role's module on whatever device is current, so the same dicts build the
models on a GPU for the check and on the ``meta`` device for the parameter-count test.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

# --- Stable Diffusion 2.1-base (512 px, epsilon prediction) ---------------------------------------------------
SD21_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1024,
    "attention_head_dim": (5, 10, 20, 20),
    "use_linear_projection": True,
    "upcast_attention": False,
}
SD21_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 768,
    "scaling_factor": 0.18215,
}
# OpenCLIP ViT-H/14's text tower as SD 2.x uses it (the last of its 24 layers dropped).
OPENCLIP_H_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "max_position_embeddings": 77,
    "projection_dim": 512,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}

# --- Mistral-7B (the transformers prompter) and LLaVA-1.6-Mistral-7B (the judge) ---------------------------
MISTRAL_7B = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1e6,
    "sliding_window": None,
    "tie_word_embeddings": False,
}
CLIP_VIT_L14_336_VISION = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
LLAVA_16_MISTRAL = {
    "text_config": {**MISTRAL_7B, "vocab_size": 32064},
    "vision_config": CLIP_VIT_L14_336_VISION,
    "projector_hidden_act": "gelu",
    "vision_feature_select_strategy": "default",
    "vision_feature_layer": -2,
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "image_seq_length": 576,
    "tie_word_embeddings": False,
}

# --- CLIP ViT-L/14 (evaluation) and ViT-B/32 (YOLO-World's text tower) -------------------------------------
CLIP_VIT_L14 = {
    "text_config": {
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "projection_dim": 768,
    },
    "vision_config": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 224,
        "patch_size": 14,
        "hidden_act": "quick_gelu",
        "projection_dim": 768,
    },
    "projection_dim": 768,
}
CLIP_VIT_B32 = {
    "text_config": {
        "vocab_size": 49408,
        "hidden_size": 512,
        "intermediate_size": 2048,
        "num_hidden_layers": 12,
        "num_attention_heads": 8,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "projection_dim": 512,
    },
    "vision_config": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "image_size": 224,
        "patch_size": 32,
        "hidden_act": "quick_gelu",
        "projection_dim": 512,
    },
    "projection_dim": 512,
}

# --- YOLO-World v2, s scale (models/yolov8s-worldv2.pt in configs/paper.yaml) ------------------------------
YOLO_WORLD_CFG = "yolov8s-worldv2.yaml"  # ultralytics' own architecture file; the "s" picks the scale
YOLO_WORLD_FILE = "yolo-world.pt"

# role -> folder name under the cache; the config key each one fills is in benchmarks.gpu_check.
ROLES = ("stable-diffusion", "mistral", "llava-next", "clip-vit-l-14", "clip-vit-b-32", "yolo-world")
BUILD_VERSION = "1"


@contextlib.contextmanager
def default_dtype(dtype) -> Iterator[None]:
    """Create parameters in ``dtype`` (a 7B model initialised in float32 first would need twice the memory)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _token_ids(tokenizer) -> dict[str, int]:
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def paper_model(part: str):
    """One module at the paper's size with random weights, on the current default device and dtype.

    ``part``: unet, vae, text-encoder (SD 2.1-base), mistral, llava-next, clip-vit-l-14, clip-vit-b-32. Under
    ``torch.device("meta")`` this allocates nothing (the parameter-count test); token ids come from the
    project's tokenizers so a saved model agrees with the tokenizer saved beside it.
    """
    from ccsr.tiny.sd import build_clip_tokenizer

    if part == "unet":
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel(**SD21_UNET)
    if part == "vae":
        from diffusers import AutoencoderKL

        return AutoencoderKL(**SD21_VAE)
    if part == "text-encoder":
        from transformers import CLIPTextConfig, CLIPTextModel

        config = CLIPTextConfig(**OPENCLIP_H_TEXT, **_token_ids(build_clip_tokenizer()))
        return CLIPTextModel(config)
    if part in ("clip-vit-l-14", "clip-vit-b-32"):
        from transformers import CLIPConfig, CLIPModel

        spec = CLIP_VIT_L14 if part == "clip-vit-l-14" else CLIP_VIT_B32
        text = {**spec["text_config"], **_token_ids(build_clip_tokenizer())}
        config = CLIPConfig(
            text_config=text, vision_config=spec["vision_config"], projection_dim=spec["projection_dim"]
        )
        return CLIPModel(config)
    if part == "mistral":
        from transformers import MistralConfig, MistralForCausalLM

        from ccsr.tiny.tokenizer import build_tokenizer

        return MistralForCausalLM(MistralConfig(**MISTRAL_7B, **_token_ids(build_tokenizer())))
    if part == "llava-next":
        from transformers import (
            CLIPVisionConfig,
            LlavaNextConfig,
            LlavaNextForConditionalGeneration,
            MistralConfig,
        )

        from ccsr.tiny.llava import IMAGE_TOKEN
        from ccsr.tiny.tokenizer import build_tokenizer

        tokenizer = build_tokenizer(extra_special=[IMAGE_TOKEN])
        spec = dict(LLAVA_16_MISTRAL)
        config = LlavaNextConfig(
            text_config=MistralConfig(**spec.pop("text_config"), **_token_ids(tokenizer)),
            vision_config=CLIPVisionConfig(**spec.pop("vision_config")),
            image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
            **spec,
        )
        return LlavaNextForConditionalGeneration(config)
    raise ValueError(f"unknown part {part!r}")


def build_paper_role(role: str, out_dir: Path, device: str = "cpu", dtype=None, seed: int = 0) -> None:
    """Write role ``role`` (one of ``ROLES``) at the paper's size with random weights into ``out_dir``."""
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = dtype or torch.float32
    torch.manual_seed(seed)
    if role == "yolo-world":
        _build_yolo_world(out_dir, seed)
        return
    with torch.device(device), default_dtype(dtype):
        if role == "stable-diffusion":
            from ccsr.tiny.sd import build_clip_tokenizer, save_sd2_pipeline

            unet, vae, text_encoder = (paper_model(p) for p in ("unet", "vae", "text-encoder"))
            save_sd2_pipeline(out_dir, vae, text_encoder, build_clip_tokenizer(), unet)
        elif role in ("clip-vit-l-14", "clip-vit-b-32"):
            from transformers import CLIPImageProcessor, CLIPProcessor

            from ccsr.tiny.sd import build_clip_tokenizer

            paper_model(role).save_pretrained(str(out_dir))
            CLIPProcessor(
                image_processor=CLIPImageProcessor(), tokenizer=build_clip_tokenizer()
            ).save_pretrained(str(out_dir))
        elif role == "mistral":
            from ccsr.tiny.tokenizer import build_tokenizer

            tokenizer = build_tokenizer(out_dir)
            model = paper_model("mistral")
            model.generation_config.pad_token_id = tokenizer.pad_token_id
            # Ids past the tokenizer's vocabulary would decode to nothing (dropped silently), leaving a random
            # model's completions nearly empty: generation never samples them.
            vocab = model.config.vocab_size
            model.generation_config.suppress_tokens = list(range(len(tokenizer), vocab))
            model.save_pretrained(str(out_dir))
        elif role == "llava-next":
            paper_model("llava-next").save_pretrained(str(out_dir))
            _llava_processor().save_pretrained(str(out_dir))
        else:
            raise ValueError(f"unknown role {role!r} (known: {', '.join(ROLES)})")
    logger.info("paper-geometry %s (random weights) written to %s", role, out_dir)


def _llava_processor():
    """LLaVA-1.6's image processing (336 px crops, patch 14, grids up to 1008 px) around the tiny tokenizer."""
    from ccsr.tiny.llava import IMAGE_TOKEN, llava_processor
    from ccsr.tiny.tokenizer import build_tokenizer

    vision = LLAVA_16_MISTRAL["vision_config"]
    tokenizer = build_tokenizer(extra_special=[IMAGE_TOKEN])
    tokenizer.model_max_length = 8192  # ~2,900 image tokens per image, as in the real model
    tokenizer.padding_side = "left"
    return llava_processor(
        tokenizer, vision["image_size"], vision["patch_size"], LLAVA_16_MISTRAL["image_grid_pinpoints"]
    )


def yolo_world_model():
    """ultralytics' YOLO-World v2 (s scale) from its architecture file: random weights, nothing downloaded."""
    from ultralytics import YOLOWorld

    return YOLOWorld(YOLO_WORLD_CFG)


def _build_yolo_world(out_dir: Path, seed: int) -> None:
    import torch

    from ccsr.class_embeddings import set_class_embedding

    yolo = yolo_world_model()
    feats = torch.nn.functional.normalize(torch.randn(CLIP_VIT_B32["projection_dim"]), dim=0)
    set_class_embedding(yolo.model, feats, "object")  # replaced by the detector's own class at run time
    yolo.save(out_dir / YOLO_WORLD_FILE)
