"""What the LoRA trainer trains on: the (prompt, image) pairs (or, for Diffusion-DPO, the (prompt, winner,
loser) preference pairs), their pixels, the frozen encoder that turns them
into VAE latent distributions and CLIP caption embeddings, the on-disk encoding cache, and the prior images
(base-model images of the class, Lee et al. 2023 eq. 2).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ccsr.rundir import atomic_save_image, atomic_save_tensors, atomic_write_text, sha256_file
from ccsr.seeds import PRIOR_IMAGE, seeded_generator

if TYPE_CHECKING:
    import torch

    from ccsr.config import Config

logger = logging.getLogger(__name__)

PRIOR_DIR = "prior"
PRIOR_METADATA = "metadata.json"
# Part of every encoding-cache key and of the checkpoint fingerprint: latents of pixels loaded another way
# (before torchvision's Resize, the long side was rounded rather than truncated) are never reused.
PIXEL_TRANSFORM = "torchvision-resize-centercrop"


@dataclass
class TrainPair:
    prompt: str
    image_path: Path
    score: float = 0.0


@dataclass
class PreferencePair:
    """One Diffusion-DPO example: a prompt, its preferred image (winner) and a lower-scored one (loser)."""

    prompt: str
    winner_path: Path
    loser_path: Path

    def sides(self) -> tuple[TrainPair, TrainPair]:
        """(winner, loser) as pairs of the same prompt, for the encoder and the encoding cache."""
        return TrainPair(self.prompt, Path(self.winner_path)), TrainPair(self.prompt, Path(self.loser_path))


def sha256_text(*parts: Any) -> str:
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------------------------
# pixels and the frozen encoder


@functools.cache
def _pixel_transform(resolution: int):
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(resolution),
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5]),
        ]
    )


def load_pixels(path: Path, resolution: int) -> torch.Tensor:
    """Resize the shorter side to ``resolution`` (bilinear), center-crop a square, scale to [-1, 1]; shape
    (3, R, R): the transform of diffusers' ``train_text_to_image_lora.py`` (its flip is drawn by the trainer).
    Resize truncates the longer side (a 4:3 image at 512 px becomes 682 x 512, not 683 x 512)."""
    from PIL import Image

    with Image.open(path) as img:
        return _pixel_transform(resolution)(img.convert("RGB"))


@dataclass
class FrozenParts:
    """The pipeline parts LoRA training never changes, plus the UNet (frozen itself, the adapter is added)."""

    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    noise_scheduler: Any


def load_frozen_parts(model_path: str, dtype: torch.dtype, device: torch.device) -> FrozenParts:
    """Tokenizer, text encoder, VAE, UNet (frozen, in ``dtype``, on ``device``) and the DDPM noise scheduler
    of a Stable Diffusion folder; raises ValueError for a prediction type the trainer has no target for."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    from ccsr.compat import diffusers_dtype

    path = model_path
    tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **diffusers_dtype(dtype))
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **diffusers_dtype(dtype))
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"{path}: unsupported scheduler prediction_type {prediction_type!r}")
    for module in (text_encoder, vae, unet):
        module.requires_grad_(False)
        module.to(device)
    text_encoder.eval()
    vae.eval()
    return FrozenParts(tokenizer, text_encoder, vae, unet, noise_scheduler)


class FrozenEncoder:
    """The frozen halves of the pipeline: VAE latent distributions of images and CLIP embeddings of captions."""

    def __init__(self, model_path: str, vae, text_encoder, tokenizer, resolution: int, device, dtype):
        self.model_path = model_path
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.resolution = resolution
        self.device = device
        self.dtype = dtype

    def latent_distribution(self, paths: list[Path], flips: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the VAE's diagonal Gaussian, float32 on the CPU; an image is flipped before encoding."""
        import torch

        pixels = []
        for path, flip in zip(paths, flips, strict=True):
            x = load_pixels(path, self.resolution)
            pixels.append(torch.flip(x, dims=[2]) if flip else x)
        with torch.no_grad():
            batch = torch.stack(pixels).to(self.device, self.dtype)
            dist = self.vae.encode(batch).latent_dist
        return dist.mean.float().cpu(), dist.std.float().cpu()

    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        import torch

        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        with torch.no_grad():
            hidden = self.text_encoder(tokens.input_ids.to(self.device))[0]
        return hidden.float().cpu()


# --------------------------------------------------------------------------------------------------------------
# the encoding cache


class EncodingCache:
    """Latent distributions (both flips) and caption embeddings of every pair, computed once.

    The distribution is cached, not a sample, so each step still draws a fresh latent exactly as the uncached
    path does; the flipped image gets its own encoding because the VAE does not commute with a flip. Files are
    keyed by content (image bytes, resolution, pixel transform, model, dtype) so later iterations reuse them.
    Only a writer (the main process) writes files; the other processes load what it wrote.
    """

    def __init__(
        self,
        encoder: FrozenEncoder,
        pairs: list[TrainPair],
        image_hashes: list[str],
        flips: bool,
        cache_dir: Path | None,
        batch_size: int,
        write: bool = True,
    ):
        import torch

        self.flips = flips
        self.cache_dir = cache_dir
        self.writer_dir = cache_dir if write else None
        if self.writer_dir is not None:
            self.writer_dir.mkdir(parents=True, exist_ok=True)
        salt = (encoder.model_path, encoder.resolution, str(encoder.dtype), PIXEL_TRANSFORM)
        latent_keys = [sha256_text("latent", h, *salt) for h in image_hashes]
        text_keys = [sha256_text("text", p.prompt, encoder.model_path, str(encoder.dtype)) for p in pairs]
        latent_names = ("mean", "std", "mean_flip", "std_flip") if flips else ("mean", "std")
        latents = [self._load("latent", k, latent_names) for k in latent_keys]
        texts = [self._load("text", k, ("embedding",)) for k in text_keys]
        n_latent, n_text = sum(t is None for t in latents), sum(t is None for t in texts)
        logger.info(
            "encoding cache: %d/%d images and %d/%d captions to encode",
            n_latent,
            len(pairs),
            n_text,
            len(pairs),
        )
        from ccsr.console import bar

        with bar(
            total=n_latent + n_text, desc="train · encoding", disable=not (n_latent and write)
        ) as progress:
            self._encode_latents(encoder, pairs, latents, latent_keys, batch_size, progress)
            self._encode_texts(encoder, pairs, texts, text_keys, batch_size, progress)
        self.mean = torch.stack([t["mean"] for t in latents])
        self.std = torch.stack([t["std"] for t in latents])
        if flips:
            self.mean_flip = torch.stack([t["mean_flip"] for t in latents])
            self.std_flip = torch.stack([t["std_flip"] for t in latents])
        self.text = torch.stack([t["embedding"] for t in texts])

    def _path(self, root: Path, kind: str, key: str) -> Path:
        return root / f"{kind}-{key}.safetensors"

    def _load(self, kind: str, key: str, names: tuple[str, ...]) -> dict[str, torch.Tensor] | None:
        from safetensors.torch import load_file

        if self.cache_dir is None:
            return None
        path = self._path(self.cache_dir, kind, key)
        if not path.exists():
            return None
        try:
            tensors = load_file(str(path))
        except Exception:  # a torn or foreign file is recomputed, never trusted
            logger.warning("ignoring unreadable encoding cache file %s", path, exc_info=True)
            return None
        return tensors if all(n in tensors for n in names) else None

    def _store(self, kind: str, key: str, entry: dict[str, torch.Tensor]) -> None:
        if self.writer_dir is not None:
            atomic_save_tensors(entry, self._path(self.writer_dir, kind, key))

    def _encode_latents(
        self, encoder, pairs, latents: list, keys: list[str], batch_size: int, progress
    ) -> None:
        """Fill the missing entries of ``latents`` (in place), ``batch_size`` images at a time."""
        todo = [i for i, t in enumerate(latents) if t is None]
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            paths = [pairs[i].image_path for i in chunk]
            mean, std = encoder.latent_distribution(paths, [False] * len(chunk))
            if self.flips:
                mean_f, std_f = encoder.latent_distribution(paths, [True] * len(chunk))
            for j, i in enumerate(chunk):
                entry = {"mean": mean[j].clone(), "std": std[j].clone()}
                if self.flips:
                    entry.update(mean_flip=mean_f[j].clone(), std_flip=std_f[j].clone())
                latents[i] = entry
                self._store("latent", keys[i], entry)
            progress.update(len(chunk))

    def _encode_texts(self, encoder, pairs, texts: list, keys: list[str], batch_size: int, progress) -> None:
        """Fill the missing entries of ``texts`` (in place), ``batch_size`` captions at a time."""
        todo = [i for i, t in enumerate(texts) if t is None]
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            hidden = encoder.text_embeddings([pairs[i].prompt for i in chunk])
            for j, i in enumerate(chunk):
                texts[i] = {"embedding": hidden[j].clone()}
                self._store("text", keys[i], texts[i])
            progress.update(len(chunk))

    def batch(self, indices: list[int], flips: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latent mean, latent std, caption embedding) of ``indices``, each image flipped where asked."""
        import torch

        idx = torch.tensor(indices, dtype=torch.long)
        mean, std = self.mean[idx], self.std[idx]
        if any(flips):
            flip = torch.tensor(flips).view(-1, 1, 1, 1)
            mean = torch.where(flip, self.mean_flip[idx], mean)
            std = torch.where(flip, self.std_flip[idx], std)
        return mean, std, self.text[idx]


# --------------------------------------------------------------------------------------------------------------
# prior preservation: base-model images of the class
#
# Lee et al. (2023, eq. 2) fine-tune on reward-weighted model samples plus ``beta`` times the plain denoising
# loss on pre-training data, because a small, narrow fine-tuning set degrades image fidelity (their table 3:
# FID recovers when the pre-training term is added). We have no pre-training set, so, as DreamBooth does, the
# base model itself stands in for it: it draws images of generic class prompts once, and the LoRA is asked to
# keep denoising those as the base model would. The term pulls the LoRA back toward the base distribution of
# the class while the fidelity term pulls it toward the selected pairs.


@dataclass(frozen=True)
class PriorSettings:
    """How the prior images are drawn, besides the base model and the seed: the class, one prompt per image
    (the templates of ``trainer.prior_prompts`` cycled up to ``trainer.prior_images``), the generator's
    sampling settings and the batch size of the drawing pipeline."""

    class_name: str
    prompts: list[str]
    resolution: int
    steps: int
    guidance_scale: float
    batch_size: int

    @classmethod
    def from_config(cls, cfg: Config) -> PriorSettings | None:
        """The run's prior settings; None when the prior term is off (``trainer.prior_weight`` 0)."""
        trainer = cfg.trainer
        if trainer.prior_weight <= 0:
            return None
        if not cfg.class_name:
            raise ValueError("trainer.prior_weight > 0 needs class_name (the prior images show that class)")
        templates = trainer.prior_prompts
        prompts = [
            templates[i % len(templates)].format(class_name=cfg.class_name)
            for i in range(trainer.prior_images)
        ]
        g = cfg.generator
        return cls(cfg.class_name, prompts, trainer.resolution, g.steps, g.guidance_scale, g.batch_size)


def prior_key(prior: PriorSettings, seed: int, model_path: str, dtype: torch.dtype) -> str:
    """Everything the prior images' pixels depend on; the cache in ``prior/`` is reused only under this key."""
    return sha256_text(
        "prior", model_path, seed, prior.resolution, prior.steps, prior.guidance_scale, dtype, *prior.prompts
    )


def load_prior(prior_dir: Path, key: str) -> tuple[list[TrainPair], list[str]] | None:
    """The cached prior images if ``metadata.json`` was written under ``key`` and every PNG is intact."""
    meta_path = prior_dir / PRIOR_METADATA
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("key") != key:
            logger.info("prior images in %s are from another setup; drawing them again", prior_dir)
            return None
        pairs, hashes = [], []
        for entry in meta["images"]:
            path = prior_dir / entry["file"]
            if not path.is_file() or sha256_file(path) != entry["sha256"]:
                logger.warning("prior image %s is missing or changed; drawing the prior images again", path)
                return None
            pairs.append(TrainPair(prompt=entry["prompt"], image_path=path))
            hashes.append(entry["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        logger.warning("ignoring unreadable prior metadata %s", meta_path, exc_info=True)
        return None
    return pairs, hashes


def prepare_prior(
    prior: PriorSettings | None,
    seed: int,
    model_path: str,
    prior_dir: Path,
    parts: FrozenParts,
    dtype: torch.dtype,
    accelerator,
) -> tuple[list[TrainPair], list[str]]:
    """The prior images (and their hashes), before any LoRA is added: cached in ``prior_dir`` or drawn now
    by the base model; none without the prior term. The main process draws and writes, the others wait,
    then load its files."""
    if prior is None:
        return [], []
    key = prior_key(prior, seed, model_path, dtype)
    with accelerator.main_process_first():
        loaded = load_prior(prior_dir, key)
        if loaded is not None:
            logger.info("reusing %d cached prior images from %s", len(loaded[0]), prior_dir)
        elif accelerator.is_main_process:
            modules = (parts.vae, parts.text_encoder, parts.tokenizer, parts.unet)
            loaded = draw_prior(prior, seed, model_path, prior_dir, key, *modules, dtype)
        else:
            raise RuntimeError(
                f"process {accelerator.process_index}: the main process left no prior images in {prior_dir}"
            )
    return loaded


def draw_prior(
    prior: PriorSettings,
    seed: int,
    model_path: str,
    prior_dir: Path,
    key: str,
    vae,
    text_encoder,
    tokenizer,
    unet,
    dtype,
) -> tuple[list[TrainPair], list[str]]:
    """Draw the prior images with the base pipeline (called before the LoRA exists) and cache them.

    Image ``i`` comes from its own generator ``(seed, PRIOR_IMAGE, i)``, so it does not depend on the batch
    size.
    Each PNG is committed atomically; ``metadata.json`` (prompts, checksums, key) goes last, so a run killed
    mid-way leaves no metadata that a later run would trust.
    """
    from diffusers import StableDiffusionPipeline

    from ccsr.compat import diffusers_dtype

    prompts = prior.prompts
    prior_dir.mkdir(parents=True, exist_ok=True)
    (prior_dir / PRIOR_METADATA).unlink(missing_ok=True)
    # The already-loaded frozen modules are reused; only the inference scheduler is read from disk.
    pipe = StableDiffusionPipeline.from_pretrained(
        model_path,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        **diffusers_dtype(dtype),
    )
    pipe.set_progress_bar_config(disable=True)
    logger.info(
        "drawing %d prior images of %r with the base model into %s", len(prompts), prior.class_name, prior_dir
    )
    entries = []
    chunk = max(1, prior.batch_size)
    for start in range(0, len(prompts), chunk):
        ids = list(range(start, min(start + chunk, len(prompts))))
        images = pipe(
            [prompts[i] for i in ids],
            height=prior.resolution,
            width=prior.resolution,
            num_inference_steps=prior.steps,
            guidance_scale=prior.guidance_scale,
            generator=[seeded_generator(seed, PRIOR_IMAGE, i) for i in ids],
            output_type="pil",
        ).images
        for i, image in zip(ids, images, strict=True):
            name = f"{i:04d}.png"
            atomic_save_image(prior_dir / name, image)
            entries.append({"file": name, "prompt": prompts[i], "seed_keys": [seed, PRIOR_IMAGE, i]})
    del pipe
    for entry in entries:
        entry["sha256"] = sha256_file(prior_dir / entry["file"])
    meta = {"key": key, "class_name": prior.class_name, "model": model_path, "images": entries}
    atomic_write_text(prior_dir / PRIOR_METADATA, json.dumps(meta, indent=1))
    pairs = [TrainPair(prompt=e["prompt"], image_path=prior_dir / e["file"]) for e in entries]
    return pairs, [e["sha256"] for e in entries]


@dataclass(frozen=True)
class TrainJob:
    """One LoRA training run, resolved and checked: what it trains on, from where, into where, its identity.

    An objective on pairs has ``preferences`` empty, one on preference pairs ``pairs`` empty; the hashes are
    the sha256 of each image file, in the same order. ``fingerprint`` is set last, from everything else.
    """

    trainer_class: type  # a ``ccsr.trainer.LoRATrainer`` subclass, from ``ccsr.train.TRAINERS``
    model_path: str  # the base model's folder (``generator.model`` resolved)
    out_dir: Path
    pairs: list[TrainPair]
    image_hashes: list[str]
    preferences: list[PreferencePair]
    preference_hashes: list[tuple[str, str]]
    init_lora: Path | None
    reference_lora: Path | None
    reference_scale: float
    encode_cache_dir: Path | None
    prior_dir: Path
    prior: PriorSettings | None  # None: no prior term
    fingerprint: str = ""
