"""Backends by name. Heavy libraries are imported only when their backend is used.

Each entry is "module:Class"; the class takes the whole resolved ``Config``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ccsr.config import Config

BACKENDS = {
    "prompter": {
        "transformers": "ccsr.prompter:TransformersPrompter",
        "vllm": "ccsr.prompter_vllm:VLLMPrompter",
        "shapes": "ccsr.shapes.backends:GrammarPrompter",
    },
    "generator": {"diffusers": "ccsr.generator:DiffusersGenerator"},
    "judge": {
        "transformers": "ccsr.judge:TransformersJudge",
        "vllm": "ccsr.judge_vllm:VLLMJudge",
        "shapes": "ccsr.shapes.backends:MeasuringJudge",
        "shapes-random": "ccsr.shapes.backends:RandomJudge",
    },
    "detector": {
        "yolo_world": "ccsr.detector:YoloWorldDetector",
        "shapes": "ccsr.shapes.backends:MeasuringDetector",
    },
}


def load_backend(role: str, cfg: Config) -> Any:
    from ccsr.devices import keep_cpu_threads

    name = getattr(cfg, role).backend
    module, cls = BACKENDS[role][name].split(":")
    with keep_cpu_threads():  # some libraries change torch's thread count on import
        return getattr(importlib.import_module(module), cls)(cfg)
