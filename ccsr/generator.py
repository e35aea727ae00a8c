"""Generator: Stable Diffusion draws the candidates (paper section 3.2), with a LoRA at a chosen scale."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from ccsr.devices import in_batches
from ccsr.lora import weights_file as lora_weights_file

if TYPE_CHECKING:
    from PIL import Image

    from ccsr.config import Config

logger = logging.getLogger(__name__)


class DiffusersGenerator:
    """A diffusers ``StableDiffusionPipeline`` (a ``roles.Generator``) loaded once; LoRAs are loaded once each,
    scales switched freely."""

    model_keys = ("generator.model",)

    def __init__(self, cfg: Config):
        import torch
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import logging as diffusers_logging

        from ccsr.compat import diffusers_dtype
        from ccsr.devices import torch_device, torch_dtype
        from ccsr.models import resolve_model

        self.cfg = cfg
        self.device = torch_device(cfg)
        self.model_path = resolve_model(cfg.generator.model, cfg.model_cache)
        diffusers_logging.disable_progress_bar()  # ccsr shows its own per-stage bars
        self.pipe = StableDiffusionPipeline.from_pretrained(
            self.model_path,
            safety_checker=None,
            requires_safety_checker=False,
            **diffusers_dtype(torch_dtype(cfg)),
        ).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self._adapters: dict[str, str] = {}  # lora folder -> adapter name
        self._torch = torch

    def _use_lora(self, lora: str | Path | None, scale: float) -> None:
        if lora is None:
            if self._adapters:
                self.pipe.disable_lora()
            return
        path = Path(lora).resolve()
        key = str(path)
        if key not in self._adapters:
            # A LoRA folder (ccsr's) or a .safetensors file (such as one in kohya format).
            file = lora_weights_file(path)
            folder, weight = file.parent, file.name
            name = "lora_" + hashlib.sha1(key.encode()).hexdigest()[:10]
            self._load_lora(folder, weight, name)
            self._adapters[key] = name
        self.pipe.enable_lora()
        self.pipe.set_adapters([self._adapters[key]], adapter_weights=[float(scale)])

    def _load_lora(self, folder: Path, weight: str, name: str) -> None:
        """A LoRA of ccsr's (UNet keys only: the trainer adapts the UNet) goes into the UNet alone. The
        pipeline's loader would look for a text-encoder part too and log, at every load, that there is none.
        A LoRA from elsewhere (a text-encoder part, another key format) goes through the pipeline's loader."""
        from safetensors import safe_open

        with safe_open(str(folder / weight), framework="pt") as weights:
            keys = list(weights.keys())
        if keys and all(k.startswith("unet.") for k in keys):
            self.pipe.unet.load_lora_adapter(
                str(folder),
                prefix="unet",
                weight_name=weight,
                adapter_name=name,
                _pipeline=self.pipe,
            )
        else:
            self.pipe.load_lora_weights(str(folder), weight_name=weight, adapter_name=name)

    def _prompt_embeds(self, prompts: list[str]):
        """The prompts' text embeddings, each prompt cut to the text encoder's window (77 CLIP tokens) exactly
        as the pipeline cuts it, and as the trainer cuts captions. Encoded here because the pipeline logs a
        warning for every batch with a longer prompt; how many were cut goes to the debug log."""
        tokenizer, encoder = self.pipe.tokenizer, self.pipe.text_encoder
        inputs = tokenizer(
            prompts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        full = int((inputs.attention_mask.sum(dim=1) >= tokenizer.model_max_length).sum())
        if full:
            logger.debug(
                "%d of %d prompts fill the text encoder's %d tokens",
                full,
                len(prompts),
                inputs.input_ids.shape[1],
            )
        mask = (
            inputs.attention_mask.to(self.device)
            if getattr(encoder.config, "use_attention_mask", False)
            else None
        )
        embeds = encoder(inputs.input_ids.to(self.device), attention_mask=mask)[0]
        return embeds.to(dtype=encoder.dtype, device=self.device)

    def images(
        self, prompts: list[str], seeds: list[int], lora: str | Path | None = None, scale: float = 1.0
    ) -> list[Image.Image]:
        """One image per (prompt, seed); each image's latents come from its own seeded generator."""
        if len(prompts) != len(seeds):
            raise ValueError("prompts and seeds must have the same length")
        self._use_lora(lora, scale)
        # Each image keeps its own seeded generator, so a smaller batch (after an out-of-memory error) draws
        # the same pixels.
        return in_batches(
            lambda c: self._draw(prompts[c], seeds[c]),
            len(prompts),
            self.cfg.generator.batch_size,
            "generator",
        )

    def _draw(self, prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        torch = self._torch
        gc = self.cfg.generator
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        with torch.inference_mode():
            result = self.pipe(
                prompt_embeds=self._prompt_embeds(prompts),
                height=gc.resolution,
                width=gc.resolution,
                num_inference_steps=gc.steps,
                guidance_scale=gc.guidance_scale,
                generator=generators,
            )
        return result.images

    def close(self) -> None:
        del self.pipe
