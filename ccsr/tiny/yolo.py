"""Tiny YOLO-World: ultralytics' YOLOv8-Worldv2 architecture with random weights, calibrated to be useful.

Two problems with plain random weights, and what the builder does about them:

1. Activations vanish through the ~20 randomly initialised conv layers, so every image gives the same
   near-zero class logit. Fix: recompute every BatchNorm's statistics on a batch of calibration images
   (the same thing training does), which brings each layer back to unit scale so the features depend on the
   image.
2. The confidence must sit near the paper's 0.6 threshold (section 3.3) for the filter step to have work to
   do: some candidates pass, others don't. Fix: set the contrastive heads' bias so that the median (over
   calibration images and class names) of the per-image maximum confidence is exactly 0.6.

Calibration images come from the tiny Stable Diffusion pipeline and class embeddings from the tiny CLIP text
tower, both built here from the same seed into a temporary folder, because those are what the detector sees
at run time. It runs at ``CALIBRATION_IMAGE_SIZE``, the detector input size of ``configs/tiny.yaml``.

The class embeddings are set directly (``txt_feats``), as ``YoloWorldDetector`` does at run time: ultralytics'
``set_classes`` downloads OpenAI's CLIP package and weights, which this project never does.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path

from ccsr.class_embeddings import set_class_embedding, text_embeddings
from ccsr.devices import torch_threads

logger = logging.getLogger(__name__)

MODEL_CFG = "yolov8n-worldv2.yaml"  # n scale: 2x faster than s on CPU; same head, neck and text path
MODEL_FILE = "yolo-world.pt"
CALIBRATION_IMAGE_SIZE = 64  # detector.image_size in configs/tiny.yaml
CALIBRATION_SIZES = (64, 128)  # generator resolutions the tiny config and tests use
CALIBRATION_PROMPTS = (
    "a photo of a giraffe",
    "an elephant in a field",
    "a zebra at sunset",
    "a dog on grass",
)
CALIBRATION_IMAGES_PER_PROMPT = 4
CALIBRATION_CLASSES = ("giraffe", "elephant", "zebra", "dog", "cat", "horse", "bird", "car", "person", "boat")
TARGET_CONFIDENCE = 0.6  # paper section 3.3: detection threshold; the median image lands exactly here
TARGET_LOGIT = math.log(TARGET_CONFIDENCE / (1 - TARGET_CONFIDENCE))


def build_yolo_world(out_dir: Path, seed: int = 0) -> None:
    """Write ``out_dir/yolo-world.pt`` (ultralytics' model format), calibrated as described above."""
    with torch_threads(1):
        _build(Path(out_dir), seed)


def _build(out_dir: Path, seed: int) -> None:
    import torch
    from ultralytics import YOLOWorld

    from ccsr.tiny.clip import build_clip
    from ccsr.tiny.sd import build_stable_diffusion

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ccsr-yolo-calib-") as tmp:
        build_stable_diffusion(Path(tmp) / "sd", seed=seed)
        build_clip(Path(tmp) / "clip", seed=seed)
        images = _calibration_images(Path(tmp) / "sd", seed)
        class_feats = text_embeddings(Path(tmp) / "clip", list(CALIBRATION_CLASSES))

    torch.manual_seed(seed)
    yolo = YOLOWorld(MODEL_CFG)
    model = yolo.model
    head = model.model[-1]
    pixels = letterbox_batch(images, CALIBRATION_IMAGE_SIZE)
    set_class_embedding(model, class_feats[0], "calibration")

    # 1. BatchNorm statistics from the calibration batch (cumulative average over one batch = batch stats).
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    with torch.no_grad():
        model(pixels)
    model.eval()
    # The .pt file stores half precision: calibrate the weights as they will be loaded.
    model.half().float()

    # 2. Head bias: per-image max logit with bias 0, for every calibration class, then shift the median.
    for contrastive in head.cv4:
        contrastive.bias.data.fill_(0.0)
    max_logits = []
    with torch.no_grad():
        for feats in class_feats:
            set_class_embedding(model, feats, "calibration")
            scores = model(pixels)[0][:, 4:].amax(dim=(1, 2)).double().clamp(1e-12, 1 - 1e-12)
            max_logits.append(torch.log(scores / (1 - scores)))
    median = torch.cat(max_logits).median().item()
    bias = TARGET_LOGIT - median
    for contrastive in head.cv4:
        contrastive.bias.data.fill_(bias)
    passed = (torch.stack(max_logits) + bias >= TARGET_LOGIT).double().mean(dim=1)
    logger.info(
        "tiny yolo-world: head bias %.3f; share of calibration images >= %.1f per class: %s (%.1f s)",
        bias,
        TARGET_CONFIDENCE,
        ", ".join(f"{c} {p:.2f}" for c, p in zip(CALIBRATION_CLASSES, passed.tolist(), strict=True)),
        time.perf_counter() - start,
    )

    set_class_embedding(model, class_feats[0], CALIBRATION_CLASSES[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    yolo.save(out_dir / MODEL_FILE)


def _calibration_images(sd_dir: Path, seed: int) -> list:
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(sd_dir))
    pipe.set_progress_bar_config(disable=True)
    images = []
    for size in CALIBRATION_SIZES:
        for p, prompt in enumerate(CALIBRATION_PROMPTS):
            n = CALIBRATION_IMAGES_PER_PROMPT
            generators = [torch.Generator().manual_seed(seed * 10_000 + p * 100 + i) for i in range(n)]
            images += pipe(
                [prompt] * n, height=size, width=size, num_inference_steps=10, generator=generators
            ).images
    return images


def letterbox_batch(images: list, size: int):
    """The predictor's preprocessing (letterbox to ``size``, RGB, 0-1 floats) for calibration batches."""
    import numpy as np
    import torch
    from ultralytics.data.augment import LetterBox

    letterbox = LetterBox((size, size), auto=False, stride=32)
    # ultralytics reads PIL images as BGR arrays, letterboxes them, then flips back to RGB.
    arrays = [letterbox(image=np.asarray(im.convert("RGB"))[:, :, ::-1])[:, :, ::-1] for im in images]
    batch = np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2))
    return torch.from_numpy(batch).float() / 255.0
