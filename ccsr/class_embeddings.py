"""YOLO-World's class input, made offline: CLIP text embeddings of class names, set into the model directly.

ultralytics' own ``set_classes`` would install OpenAI's ``clip`` package from git and download its weights,
which fails offline. These two functions do its work with the transformers CLIP text tower instead. The
detector uses them at run time and the YOLO-World builders (the tiny one, the paper-size one) when they
calibrate or save a model, so they depend on nothing but torch and transformers.
"""

from __future__ import annotations

from pathlib import Path


def text_embeddings(clip_path: str | Path, names: list[str], device=None):
    """L2-normalised CLIP text embeddings, shape (len(names), projection_dim): YOLO-World's class input."""
    import torch
    from transformers import CLIPModel, CLIPTokenizer

    from ccsr.compat import pooled_output

    tokenizer = CLIPTokenizer.from_pretrained(str(clip_path))
    model = CLIPModel.from_pretrained(str(clip_path)).to(device or "cpu").eval()
    tokens = tokenizer(names, padding=True, truncation=True, return_tensors="pt").to(device or "cpu")
    with torch.no_grad():
        out = model.get_text_features(**tokens)
    return torch.nn.functional.normalize(pooled_output(out).float(), dim=-1).cpu()


def set_class_embedding(model, feats, name: str) -> None:
    """Point a WorldModel at one class: what ``set_classes`` does, minus its CLIP download."""
    model.txt_feats = feats.reshape(1, 1, -1).float().clone()
    model.model[-1].nc = 1
    model.names = {0: name}
