"""Tiny LLaVA-Next (CLIP vision tower + Mistral text model) with random weights, built offline.

Random weights answer with arbitrary tokens, which would make every judgment 'nan'-like noise. So after
initialisation the lm_head rows of the yes/no spellings are set from the model's own hidden states on a few
calibration images and questions: all yes/no rows share a large component along the mean hidden state (so
one of them is always the greedy first token) and differ by +/- a direction along which the hidden state
varies from image to image (so the answer depends on the image and P(yes) is spread over (0, 1)).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"

# name -> (vision image/crop size, patch size, grid pinpoints as (height, width)).
GEOMETRIES = {
    # The embedded default: 32 px crops of 8 px patches; a 64x64 image is 16 + 72 = 88 image tokens.
    "tiny": (32, 8, [[32, 64], [64, 32], [64, 64]]),
    # The real llava-v1.6 geometry (336 px crops, patch 14, grids up to 672x672 as used by
    # llava-hf/llava-v1.6-mistral-7b-hf): a 512-768 px image becomes ~2,200-2,900 image tokens. Used by the
    # judge benchmark so that the image dominates the sequence as it does in the real model.
    "v1.6": (336, 14, [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]),
}

# Ranking of the spellings inside each answer: the "▁"-prefixed capitalised word first, as in Mistral's
# "[/INST] Yes"; the other spellings get a smaller share of the common component so they rank below.
_SPELLINGS = (("▁Yes", "▁No", 1.0), ("Yes", "No", 0.9), ("▁yes", "▁no", 0.85), ("yes", "no", 0.8))
STOP_EMBEDDING_NORM = 10.0  # input embedding of every yes/no spelling: dominates the residual stream there
STOP_LOGIT_SCALE = 4.0  # the EOS row reads that direction, so "Yes"/"No" is followed by </s>
COMMON_LOGIT = 20.0  # yes/no logits this far above the mean so they beat the ~1,500 random-row tokens
SPREAD_LOGIT = 2.0  # std of the yes-minus-no logit over calibration inputs: P(yes) varied, not saturated


def _calibration_images(seed: int, size_range: tuple[int, int], n: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        w, h = (int(x) for x in rng.integers(size_range[0], size_range[1] + 1, size=2))
        base = rng.uniform(0, 255, size=3)
        noise = rng.normal(0, rng.uniform(10, 80), size=(h, w, 3))
        images.append(Image.fromarray(np.clip(base + noise, 0, 255).astype("uint8")))
    return images


def _calibration_questions() -> list[str]:
    from ccsr.config_files import shipped_file
    from ccsr.questions import QuestionSet

    # The shipped question set, never one of the current folder: the embedded model must not depend on it.
    qs = QuestionSet.load(shipped_file("prompts/questions.yaml"))
    return qs.render("giraffe", "A tall giraffe standing in the savanna at sunset, golden hour light.")


def _last_hidden_states(model, processor, images, questions) -> torch.Tensor:
    """Final (normed) hidden state at the last prompt position for every (image, question)."""
    import torch

    states = []
    with torch.inference_mode():
        for image in images:
            for q in questions:
                conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
                prompt = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
                inputs = processor(images=image, text=prompt, add_special_tokens=False, return_tensors="pt")
                out = model.model(**inputs)
                states.append(out.last_hidden_state[0, -1].float())
    return torch.stack(states)


def _answer_then_stop(model, tokenizer, generator: torch.Generator) -> torch.Tensor:
    """Give every yes/no spelling a large input embedding along one random direction; returns it. The EOS row
    of lm_head reads that direction (set after calibration), so free-text generation says "Yes" and stops
    instead of rambling, as an instruction-tuned judge does."""
    import torch

    hidden = model.config.text_config.hidden_size
    stop = torch.randn(hidden, generator=generator)
    stop = stop / stop.norm()
    embed = model.get_input_embeddings().weight
    vocab = tokenizer.get_vocab()
    with torch.no_grad():
        for spellings in _SPELLINGS:
            for token in spellings[:2]:
                embed[vocab[token]] = (STOP_EMBEDDING_NORM * stop).to(embed.dtype)
    return stop


def _calibrate_answers(model, processor, images, questions, stop: torch.Tensor) -> None:
    import torch

    h = _last_hidden_states(model, processor, images, questions)  # [images * questions, hidden]
    mean = h.mean(0)
    common = mean / mean.norm()
    # The answer direction mixes, at equal weight, the top principal component of the image-to-image
    # variation (each question's states centred over images) and that of the question-to-question variation,
    # so that answers differ between images and between the questions about one image.
    per_question = h.view(len(images), len(questions), -1)
    question_means = per_question.mean(0)
    directions = []
    for variation in ((per_question - question_means).reshape(h.shape[0], -1), question_means - mean):
        _, _, v = torch.linalg.svd(variation, full_matrices=False)
        directions.append(v[0] / (variation @ v[0]).std().clamp_min(1e-6))
    direction = directions[0] + directions[1]
    direction = direction - (direction @ common) * common
    direction = direction / direction.norm()
    offset = h @ direction  # the yes-minus-no logit is proportional to this, centred on its mean
    spread = SPREAD_LOGIT / (2 * (offset - offset.mean()).std().clamp_min(1e-6))
    # Put the calibration mean of the yes-minus-no logit at 0 by borrowing from the common direction.
    shift = -offset.mean() * spread / (mean @ common)
    height = COMMON_LOGIT / (h @ common).min().clamp_min(1e-3)
    vocab = processor.tokenizer.get_vocab()
    weight = model.lm_head.weight
    with torch.no_grad():
        for yes, no, share in _SPELLINGS:
            along = share * height * common
            weight[vocab[yes]] = (along + spread * direction + shift * common).to(weight.dtype)
            weight[vocab[no]] = (along - spread * direction - shift * common).to(weight.dtype)
        # EOS: orthogonal to the answer directions so it stays low where the answer is read.
        stop = stop - (stop @ common) * common - (stop @ direction) * direction
        weight[processor.tokenizer.eos_token_id] = (STOP_LOGIT_SCALE * stop).to(weight.dtype)


def llava_processor(tokenizer, crop: int, patch: int, pinpoints: list[list[int]]):
    """LLaVA-Next's processor around ``tokenizer``: ``crop`` px tiles of ``patch`` px patches on the grids
    ``pinpoints``, the chat template, the image token and the CLS token the "default" strategy drops."""
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    from ccsr.tiny.tokenizer import CHAT_TEMPLATE

    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": crop},
        crop_size={"height": crop, "width": crop},
        image_grid_pinpoints=pinpoints,
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # the CLS token, dropped by the "default" strategy
    )


def build_llava_next(out_dir: Path, seed: int = 0, geometry: str = "tiny") -> None:
    """Write a loadable LLaVA-Next folder (safetensors + processor + chat template) to ``out_dir``."""
    import torch
    from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    from ccsr.tiny.llm import tiny_mistral_config
    from ccsr.tiny.tokenizer import build_tokenizer

    crop, patch, pinpoints = GEOMETRIES[geometry]
    tokenizer = build_tokenizer(extra_special=[IMAGE_TOKEN])
    tokenizer.model_max_length = 8192  # the v1.6 geometry puts ~2,900 image tokens in one prompt
    tokenizer.padding_side = "left"
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=crop,
        patch_size=patch,
        projection_dim=32,
    )
    # No sliding window, as in Mistral-7B-Instruct-v0.2, the text model of LLaVA-1.6-Mistral.
    text = tiny_mistral_config(tokenizer, max_positions=8192, sliding_window=None)
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=(crop // patch) ** 2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    processor = llava_processor(tokenizer, crop, patch, pinpoints)
    if geometry == "tiny":
        images = _calibration_images(seed, (24, 96), 8)
    else:
        images = _calibration_images(seed, (512, 768), 3)
    stop = _answer_then_stop(model, tokenizer, torch.Generator().manual_seed(seed))
    _calibrate_answers(model, processor, images, _calibration_questions(), stop)
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    processor.save_pretrained(str(out_dir))
    logger.info("tiny LLaVA-Next (%s geometry) written to %s", geometry, out_dir)
