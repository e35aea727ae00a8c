"""Tiny CLIP: the real CLIPModel + CLIPProcessor at toy size, random weights, built offline.

Two users: the evaluator's CLIP score (image and text towers) and the detector, which embeds a class name
with the text tower for YOLO-World. YOLO-World's text features are 512-d (CLIP ViT-B/32), hence the
projection_dim of 512 even though the towers are 32 wide.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ccsr.tiny.sd import build_clip_tokenizer, tiny_clip_text_config

logger = logging.getLogger(__name__)

PROJECTION_DIM = 512  # CLIP ViT-B/32, the text encoder YOLO-World was trained with
IMAGE_SIZE = 32


def build_clip(out_dir: Path, seed: int = 0) -> None:
    """Write a tiny ``CLIPModel`` (safetensors) and its ``CLIPProcessor`` to ``out_dir``."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionConfig

    tokenizer = build_clip_tokenizer()
    text_config = tiny_clip_text_config(len(tokenizer), projection_dim=PROJECTION_DIM)
    vision_config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=8,
        projection_dim=PROJECTION_DIM,
    )
    config = CLIPConfig(
        text_config=text_config.to_dict(),
        vision_config=vision_config.to_dict(),
        projection_dim=PROJECTION_DIM,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config)
    # Random towers give image and text embeddings at a cosine around 0, negative half the time, so the CLIP
    # score (100 * max(cos, 0)) would be 0 for most pairs and win/tie/loss all ties. A constant feature that
    # both projections map to one shared direction lifts the cosines to about 0.35 +- 0.06 while keeping them
    # image- and text-dependent, so the tiny demo's evaluation has differences to compare.
    with torch.no_grad():
        shared = torch.randn(PROJECTION_DIM, generator=torch.Generator().manual_seed(seed + 1))
        shared /= shared.norm()
        for norm, projection in (
            (model.vision_model.post_layernorm, model.visual_projection),
            (model.text_model.final_layer_norm, model.text_projection),
        ):
            norm.bias[0] = 3.0
            projection.weight[:, 0] = 6.0 * shared
    model.save_pretrained(str(out_dir), safe_serialization=True)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True,
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(out_dir))
