"""Detector: YOLO-World's confidence that an image shows the class (paper section 3.3, filter step).

The class name is embedded offline with the CLIP text tower through transformers (``detector.text_model``:
``openai/clip-vit-base-patch32`` for the real YOLO-World, ``ccsr-tiny/clip`` for the tiny one) and handed to
the model as its text features (``ccsr.class_embeddings``). ultralytics' own ``set_classes`` would instead
install OpenAI's ``clip`` package from git and download its weights, which fails offline.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from ccsr.class_embeddings import set_class_embedding, text_embeddings

if TYPE_CHECKING:
    from PIL import Image

    from ccsr.config import Config

logger = logging.getLogger(__name__)

# Low enough that the best box of an image survives the predictor's confidence filter, so the maximum can be
# read; the paper's threshold (0.6) is applied by the loop, not here.
READ_CONFIDENCE = 0.001


def find_model_file(path: str | Path) -> Path:
    """A YOLO-World ``.pt`` file, or a folder holding exactly one (ultralytics' own format): the file itself.

    Anything else raises FileNotFoundError with a one-line message naming ``detector.model``, the path as
    given and what to give instead; the command line's input check shows the same line.
    """
    found = Path(path).expanduser()
    if found.is_dir():
        files = sorted(found.glob("*.pt"))
        if len(files) == 1:
            return files[0]
        raise FileNotFoundError(
            f"detector.model: {path} holds {len(files) or 'no'} .pt files; give a YOLO-World .pt file or a "
            "folder with one .pt file"
        )
    if not found.exists():
        raise FileNotFoundError(
            f"detector.model: {path} is not a .pt file or a folder with one; download the YOLO-World weights "
            "(e.g. yolov8s-worldv2.pt) and give their local path"
        )
    if found.suffix != ".pt":
        raise FileNotFoundError(
            f"detector.model: {path} is not a .pt file; give a YOLO-World .pt file or a folder with one .pt file"
        )
    return found


class YoloWorldDetector:
    """ultralytics YOLO-World (a ``roles.Detector``) with class embeddings set offline; one class at a time,
    images in batches."""

    model_keys = ("detector.model", "detector.text_model")

    def __init__(self, cfg: Config):
        from ultralytics import YOLOWorld

        from ccsr.devices import torch_device
        from ccsr.models import resolve_model

        self.cfg = cfg
        self.device = torch_device(cfg)
        # Loading a .pt file unpickles it, which can run arbitrary code. Only files the user named in the
        # config (or the project's own tiny build) are loaded, never anything found in a run directory.
        self.model_file = find_model_file(resolve_model(cfg.detector.model, cfg.model_cache))
        self.text_model = resolve_model(cfg.detector.text_model, cfg.model_cache)
        self.yolo = YOLOWorld(str(self.model_file))
        self._embeddings: dict = {}
        self._current: str | None = None
        logger.info("detector: %s, class text from %s, on %s", self.model_file, self.text_model, self.device)

    def _embedding(self, class_name: str):
        if class_name not in self._embeddings:
            self._embeddings[class_name] = text_embeddings(self.text_model, [class_name], device=self.device)[
                0
            ]
        return self._embeddings[class_name]

    def _set_class(self, class_name: str) -> None:
        if self._current == class_name:
            return
        feats = self._embedding(class_name)
        set_class_embedding(self.yolo.model, feats, class_name)
        predictor = self.yolo.predictor
        if predictor is not None:
            # The predictor runs its own (fused) copy of the model: give it the class too.
            set_class_embedding(predictor.model.model, feats, class_name)
            predictor.model.names = {0: class_name}
        self._current = class_name

    def confidence(self, images: list[Image.Image], class_name: str) -> list[float]:
        """Per image, the highest confidence of a ``class_name`` box, 0.0 when there is none."""
        if not images:
            return []
        from ccsr.devices import keep_cpu_threads

        self._set_class(class_name)
        with keep_cpu_threads():  # ultralytics resets torch's thread count on every predict
            results = self.yolo.predict(
                [im.convert("RGB") for im in images],
                conf=READ_CONFIDENCE,
                imgsz=self.cfg.detector.image_size,
                device=str(self.device),
                verbose=False,
            )
        return [float(r.boxes.conf.max()) if len(r.boxes) else 0.0 for r in results]

    def close(self) -> None:
        from ccsr.devices import free_memory

        del self.yolo
        self._embeddings.clear()
        free_memory()
