"""LoRA fine-tuning of the UNet on the optimal (prompt, image) pairs: step 5 of the loop (paper section 3).

The paper's recipe (rank 4 on the attention projections, lr 1e-4 constant, batch 18, 100 epochs, 512 px,
random horizontal flip, fp16 mixed precision) lives in :class:`ccsr.config.TrainerConfig`; this module reads
top to bottom: load the frozen pipeline parts, add a peft LoRA to the UNet, encode the data (once, when
``cache_latents`` is on), run the denoising loss, checkpoint, write a diffusers-format LoRA.

Reproducibility does not depend on where a run was interrupted: every random draw of optimizer step ``s``
comes from a generator seeded by ``(cfg.seed, s, micro_batch)`` and the data order of epoch ``e`` from
``(cfg.seed, e)``, so a resumed run draws exactly what the uninterrupted run drew. Nor does it depend on
the number of processes (``accelerate launch`` / torchrun, see ``ccsr.train_cli``): each process draws the
whole global batch's numbers and keeps its slice, so only the float summation order differs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ccsr.devices import torch_device
from ccsr.models import resolve_model

if TYPE_CHECKING:
    import torch

    from ccsr.config import Config

logger = logging.getLogger(__name__)

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
ADAPTER_NAME = "default"
CHECKPOINTS_DIR = "checkpoints"
TRAIN_LOG = "train_log.jsonl"
RESULT_FILE = "train_result.json"
PRIOR_DIR = "prior"
PRIOR_METADATA = "metadata.json"
# Trainer fields that do not change the trained weights: a checkpoint written under other values of these is
# still a valid starting point. cache_latents only moves where the VAE runs (same math, see tests).
_FINGERPRINT_EXCLUDED = ("checkpoint_every", "checkpoints_kept", "cache_latents", "init_from", "train_on")


@dataclass
class TrainPair:
    prompt: str
    image_path: Path
    score: float = 0.0


@dataclass
class TrainResult:
    lora_dir: Path
    steps: int
    final_loss: float
    seconds: float


# --------------------------------------------------------------------------------------------------------------
# small helpers: seeding, hashing, atomic files


def _generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator for one (seed, keys) tuple; CPU so the draws are the same on every device."""
    import numpy as np
    import torch

    state = np.random.SeedSequence([seed % 2**63, *keys]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) % 2**63)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sha256_text(*parts: Any) -> str:
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).hexdigest()


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon-prediction,
    min(SNR, gamma) / (SNR + 1) for v-prediction. A zero-terminal-SNR schedule has SNR 0 at its last step,
    where the epsilon weight's limit is 1 (not 0 / 0)."""
    import torch

    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return torch.where(snr > 0, clipped / snr.clamp(min=1e-12), torch.ones_like(snr))
    return clipped / (snr + 1)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    _fsync(tmp)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------------------
# data


def _load_pixels(path: Path, resolution: int) -> torch.Tensor:
    """Resize the shorter side to ``resolution``, center-crop a square, scale to [-1, 1]; shape (3, R, R)."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        scale = resolution / min(w, h)
        size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
        img = img.resize(size, Image.Resampling.BILINEAR)
        left = (size[0] - resolution) // 2
        top = (size[1] - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
        array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class _Encoder:
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
            x = _load_pixels(path, self.resolution)
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


class _EncodingCache:
    """Latent distributions (both flips) and caption embeddings of every pair, computed once.

    The distribution is cached, not a sample, so each step still draws a fresh latent exactly as the uncached
    path does; the flipped image gets its own encoding because the VAE does not commute with a flip. Files are
    keyed by content (image bytes, resolution, model, dtype) so later iterations reuse them.
    """

    def __init__(
        self,
        encoder: _Encoder,
        pairs: list[TrainPair],
        image_hashes: list[str],
        flips: bool,
        cache_dir: Path | None,
        batch_size: int,
        write: bool = True,
    ):
        import torch
        from safetensors.torch import load_file
        from tqdm.auto import tqdm

        self.flips = flips
        # Only the main process writes (the others load what it wrote, see train_lora).
        writer_dir = cache_dir if write else None
        if writer_dir is not None:
            writer_dir.mkdir(parents=True, exist_ok=True)
        salt = (encoder.model_path, encoder.resolution, str(encoder.dtype))
        latent_keys = [_sha256_text("latent", h, *salt) for h in image_hashes]
        text_keys = [_sha256_text("text", p.prompt, encoder.model_path, str(encoder.dtype)) for p in pairs]

        def load(kind: str, key: str, names: tuple[str, ...]) -> dict[str, torch.Tensor] | None:
            if cache_dir is None:
                return None
            path = cache_dir / f"{kind}-{key}.safetensors"
            if not path.exists():
                return None
            try:
                tensors = load_file(str(path))
            except Exception as exc:  # a torn or foreign file is recomputed, never trusted
                logger.warning("ignoring unreadable encoding cache file %s (%s)", path, exc)
                return None
            return tensors if all(n in tensors for n in names) else None

        latent_names = ("mean", "std", "mean_flip", "std_flip") if flips else ("mean", "std")
        latents: list[dict[str, torch.Tensor] | None] = [load("latent", k, latent_names) for k in latent_keys]
        texts: list[dict[str, torch.Tensor] | None] = [load("text", k, ("embedding",)) for k in text_keys]
        todo_latent = [i for i, t in enumerate(latents) if t is None]
        todo_text = [i for i, t in enumerate(texts) if t is None]
        logger.info(
            "encoding cache: %d/%d images and %d/%d captions to encode",
            len(todo_latent),
            len(pairs),
            len(todo_text),
            len(pairs),
        )
        progress = tqdm(
            total=len(todo_latent) + len(todo_text), desc="encoding", disable=not (todo_latent and write)
        )
        for start in range(0, len(todo_latent), batch_size):
            chunk = todo_latent[start : start + batch_size]
            paths = [pairs[i].image_path for i in chunk]
            mean, std = encoder.latent_distribution(paths, [False] * len(chunk))
            if flips:
                mean_f, std_f = encoder.latent_distribution(paths, [True] * len(chunk))
            for j, i in enumerate(chunk):
                entry = {"mean": mean[j].clone(), "std": std[j].clone()}
                if flips:
                    entry.update(mean_flip=mean_f[j].clone(), std_flip=std_f[j].clone())
                latents[i] = entry
                if writer_dir is not None:
                    _atomic_save_tensors(entry, writer_dir / f"latent-{latent_keys[i]}.safetensors")
            progress.update(len(chunk))
        for start in range(0, len(todo_text), batch_size):
            chunk = todo_text[start : start + batch_size]
            hidden = encoder.text_embeddings([pairs[i].prompt for i in chunk])
            for j, i in enumerate(chunk):
                texts[i] = {"embedding": hidden[j].clone()}
                if writer_dir is not None:
                    _atomic_save_tensors(texts[i], writer_dir / f"text-{text_keys[i]}.safetensors")
            progress.update(len(chunk))
        progress.close()
        self.mean = torch.stack([t["mean"] for t in latents])
        self.std = torch.stack([t["std"] for t in latents])
        if flips:
            self.mean_flip = torch.stack([t["mean_flip"] for t in latents])
            self.std_flip = torch.stack([t["std_flip"] for t in latents])
        self.text = torch.stack([t["embedding"] for t in texts])

    def batch(self, indices: list[int], flips: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        import torch

        idx = torch.tensor(indices, dtype=torch.long)
        mean, std = self.mean[idx], self.std[idx]
        if any(flips):
            flip = torch.tensor(flips).view(-1, 1, 1, 1)
            mean = torch.where(flip, self.mean_flip[idx], mean)
            std = torch.where(flip, self.std_flip[idx], std)
        return mean, std, self.text[idx]


# --------------------------------------------------------------------------------------------------------------
# LoRA weights in and out


def _load_lora_into_adapter(unet, lora_dir: Path, rank: int) -> None:
    """Set the adapter's weights from a diffusers-format (or kohya-format) LoRA folder or file."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import set_peft_model_state_dict

    lora_dir = Path(lora_dir)
    if lora_dir.is_dir() and not (lora_dir / LORA_WEIGHTS_NAME).exists():
        raise ValueError(f"init LoRA folder {lora_dir} has no {LORA_WEIGHTS_NAME}")
    if not lora_dir.exists():
        raise ValueError(f"init LoRA {lora_dir} does not exist")
    kwargs = {} if lora_dir.is_dir() else {"weight_name": lora_dir.name}
    source = str(lora_dir if lora_dir.is_dir() else lora_dir.parent)
    state_dict, network_alphas = StableDiffusionPipeline.lora_state_dict(source, **kwargs)
    unet_sd = {k[len("unet.") :]: v for k, v in state_dict.items() if k.startswith("unet.")}
    if not unet_sd:
        raise ValueError(f"init LoRA {lora_dir} holds no UNet weights")
    if network_alphas:
        logger.warning(
            "init LoRA %s carries kohya alphas; they are ignored (trainer.alpha is used)", lora_dir
        )
    peft_sd = convert_unet_state_dict_to_peft(unet_sd)
    ranks = {v.shape[0] for k, v in peft_sd.items() if ".lora_A." in k}
    if ranks != {rank}:
        raise ValueError(f"init LoRA {lora_dir} has rank {sorted(ranks)}, but trainer.rank is {rank}")
    result = set_peft_model_state_dict(unet, peft_sd, adapter_name=ADAPTER_NAME)
    unexpected = getattr(result, "unexpected_keys", [])
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if unexpected or missing:
        raise ValueError(
            f"init LoRA {lora_dir} does not match trainer.target_modules "
            f"({len(unexpected)} unexpected, {len(missing)} missing keys, e.g. {(unexpected + missing)[0]})"
        )


def _adapter_state(unet) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(unet).items()}


def save_lora(unet, out_dir: Path) -> Path:
    """Write ``out_dir/pytorch_lora_weights.safetensors`` (diffusers format) atomically; return its path."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import get_peft_model_state_dict

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir / f".lora.tmp{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    # The adapter metadata carries lora_alpha: without it a loader assumes alpha == rank.
    metadata = unet.peft_config[ADAPTER_NAME].to_dict()
    # Sets (target_modules) iterate in a per-process hash order: sort them so the same weights give the same bytes.
    metadata = {k: sorted(v) if isinstance(v, set) else v for k, v in metadata.items()}
    StableDiffusionPipeline.save_lora_weights(
        save_directory=str(tmp_dir),
        unet_lora_layers={k: v.detach().float().contiguous() for k, v in layers.items()},
        safe_serialization=True,
        unet_lora_adapter_metadata=metadata,
    )
    _fsync(tmp_dir / LORA_WEIGHTS_NAME)
    os.replace(tmp_dir / LORA_WEIGHTS_NAME, out_dir / LORA_WEIGHTS_NAME)
    shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir / LORA_WEIGHTS_NAME


# --------------------------------------------------------------------------------------------------------------
# checkpoints


def _checkpoint_step(path: Path) -> int | None:
    name = path.name
    if not name.startswith("step-"):
        return None
    try:
        return int(name[len("step-") :])
    except ValueError:
        return None


def _write_checkpoint(
    root: Path, step: int, adapter: dict, optimizer, lr_scheduler, state: dict, kept: int
) -> Path:
    """``root/step-<n>/``: files fsynced, ``complete.json`` (checksums) last, then one rename."""
    import torch

    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    from safetensors.torch import save_file

    save_file(adapter, str(tmp / "adapter.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
    checksums = {}
    for path in sorted(tmp.iterdir()):
        _fsync(path)
        checksums[path.name] = _sha256_file(path)
    (tmp / "complete.json").write_text(json.dumps({"step": step, "sha256": checksums}, indent=1))
    _fsync(tmp / "complete.json")
    _fsync(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(root)
    complete = sorted((p for p in root.iterdir() if _checkpoint_step(p) is not None), key=_checkpoint_step)
    for old in complete[:-kept]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _valid_checkpoint(path: Path, fingerprint: str) -> dict | None:
    """The checkpoint's state if it is complete, intact and from the same training setup, else None."""
    marker = path / "complete.json"
    if not marker.exists():
        logger.warning("skipping checkpoint %s: no complete.json (torn write)", path)
        return None
    try:
        sums = json.loads(marker.read_text(encoding="utf-8"))["sha256"]
        for name, digest in sums.items():
            if _sha256_file(path / name) != digest:
                logger.warning("skipping checkpoint %s: checksum mismatch in %s", path, name)
                return None
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError) as exc:
        logger.warning("skipping checkpoint %s: unreadable (%s)", path, exc)
        return None
    if state.get("fingerprint") != fingerprint:
        logger.warning("skipping checkpoint %s: written for a different training setup", path)
        return None
    return state


def _latest_checkpoint(root: Path, fingerprint: str) -> tuple[Path, dict] | None:
    if not root.is_dir():
        return None
    steps = sorted((p for p in root.iterdir() if _checkpoint_step(p) is not None), key=_checkpoint_step)
    for path in reversed(steps):
        state = _valid_checkpoint(path, fingerprint)
        if state is not None:
            return path, state
    return None


# --------------------------------------------------------------------------------------------------------------
# prior preservation: base-model images of the class
#
# Lee et al. (2023, eq. 2) fine-tune on reward-weighted model samples plus ``beta`` times the plain denoising
# loss on pre-training data, because a small, narrow fine-tuning set degrades image fidelity (their table 3:
# FID recovers when the pre-training term is added). We have no pre-training set, so, as DreamBooth does, the
# base model itself stands in for it: it draws images of generic class prompts once, and the LoRA is asked to
# keep denoising those as the base model would. The term pulls the LoRA back toward the base distribution of
# the class while the fidelity term pulls it toward the selected pairs.


def _prior_prompts(cfg: Config) -> list[str]:
    """The prompt of each prior image: the templates cycled up to ``trainer.prior_images``."""
    templates = cfg.trainer.prior_prompts
    return [
        templates[i % len(templates)].format(class_name=cfg.class_name)
        for i in range(cfg.trainer.prior_images)
    ]


def _prior_key(cfg: Config, model_path: str, dtype: torch.dtype) -> str:
    """Everything the prior images' pixels depend on; the cache in ``prior/`` is reused only under this key."""
    g = cfg.generator
    return _sha256_text(
        "prior",
        model_path,
        cfg.seed,
        cfg.trainer.resolution,
        g.steps,
        g.guidance_scale,
        dtype,
        *_prior_prompts(cfg),
    )


def _load_prior(prior_dir: Path, key: str) -> tuple[list[TrainPair], list[str]] | None:
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
            if not path.is_file() or _sha256_file(path) != entry["sha256"]:
                logger.warning("prior image %s is missing or changed; drawing the prior images again", path)
                return None
            pairs.append(TrainPair(prompt=entry["prompt"], image_path=path))
            hashes.append(entry["sha256"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("ignoring unreadable prior metadata %s (%s)", meta_path, exc)
        return None
    return pairs, hashes


def _draw_prior(
    cfg: Config, model_path: str, prior_dir: Path, key: str, vae, text_encoder, tokenizer, unet, dtype
) -> tuple[list[TrainPair], list[str]]:
    """Draw the prior images with the base pipeline (called before the LoRA exists) and cache them.

    Image ``i`` comes from its own generator ``(cfg.seed, 2, i)``, so it does not depend on the batch size.
    PNGs are written to a temporary name and renamed; ``metadata.json`` (prompts, checksums, key) goes last,
    so a run killed mid-way leaves no metadata that a later run would trust.
    """
    from diffusers import StableDiffusionPipeline

    prompts = _prior_prompts(cfg)
    g = cfg.generator
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
        dtype=dtype,
    )
    pipe.set_progress_bar_config(disable=True)
    logger.info(
        "drawing %d prior images of %r with the base model into %s", len(prompts), cfg.class_name, prior_dir
    )
    entries = []
    chunk = max(1, g.batch_size)
    for start in range(0, len(prompts), chunk):
        ids = list(range(start, min(start + chunk, len(prompts))))
        images = pipe(
            [prompts[i] for i in ids],
            height=cfg.trainer.resolution,
            width=cfg.trainer.resolution,
            num_inference_steps=g.steps,
            guidance_scale=g.guidance_scale,
            generator=[_generator(cfg.seed, 2, i) for i in ids],
            output_type="pil",
        ).images
        for i, image in zip(ids, images, strict=True):
            name = f"{i:04d}.png"
            tmp = prior_dir / f".{name}.tmp{os.getpid()}"
            image.save(tmp, format="PNG")
            _fsync(tmp)
            os.replace(tmp, prior_dir / name)
            entries.append({"file": name, "prompt": prompts[i], "seed_keys": [cfg.seed, 2, i]})
    del pipe
    for entry in entries:
        entry["sha256"] = _sha256_file(prior_dir / entry["file"])
    meta = {"key": key, "class_name": cfg.class_name, "model": model_path, "images": entries}
    _atomic_write_text(prior_dir / PRIOR_METADATA, json.dumps(meta, indent=1))
    pairs = [TrainPair(prompt=e["prompt"], image_path=prior_dir / e["file"]) for e in entries]
    return pairs, [e["sha256"] for e in entries]


# --------------------------------------------------------------------------------------------------------------
# the trainer


def _loss_weights(pairs: list[TrainPair], reward_weighted: bool) -> list[float]:
    """Per-pair loss weights. Reward-weighted: proportional to max(score, 0), mean 1 (Lee et al. 2023, eq. 2)."""
    if not reward_weighted:
        return [1.0] * len(pairs)
    clipped = [max(float(p.score), 0.0) for p in pairs]
    total = sum(clipped)
    if total == 0.0:
        logger.warning("reward-weighted loss: every score is <= 0, falling back to uniform weights")
        return [1.0] * len(pairs)
    return [c * len(pairs) / total for c in clipped]


def _validate(cfg: Config, pairs: list[TrainPair]) -> None:
    t = cfg.trainer
    if not pairs:
        raise ValueError("train_lora needs at least one (prompt, image) pair")
    if t.prior_weight < 0:
        raise ValueError(f"trainer.prior_weight must be >= 0, got {t.prior_weight}")
    if t.prior_weight > 0:
        if not cfg.class_name:
            raise ValueError("trainer.prior_weight > 0 needs class_name (the prior images show that class)")
        if t.prior_images < 1 or not t.prior_prompts:
            raise ValueError(
                "trainer.prior_weight > 0 needs trainer.prior_images >= 1 and trainer.prior_prompts"
            )
        try:
            _prior_prompts(cfg)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"trainer.prior_prompts: a template may only use the {{class_name}} placeholder ({exc!r})"
            ) from exc
    if t.max_steps is not None and t.max_steps <= 0:
        raise ValueError(f"trainer.max_steps must be > 0 or null, got {t.max_steps}")
    if t.checkpoint_every < 0:
        raise ValueError(f"trainer.checkpoint_every must be >= 0, got {t.checkpoint_every}")
    missing = [str(p.image_path) for p in pairs if not Path(p.image_path).is_file()]
    if missing:
        raise ValueError(f"training image not found: {missing[0]} ({len(missing)} missing in total)")


def _fingerprint(
    cfg: Config, model_path: str, pairs: list[TrainPair], image_hashes: list[str], init_hash: str | None
) -> str:
    trainer = {k: v for k, v in asdict(cfg.trainer).items() if k not in _FINGERPRINT_EXCLUDED}
    payload = {
        "model": model_path,
        "seed": cfg.seed,
        "trainer": trainer,
        "pairs": [[p.prompt, h, float(p.score)] for p, h in zip(pairs, image_hashes, strict=True)],
        "init_lora": init_hash,
    }
    if cfg.trainer.prior_weight > 0:
        # The prior images are a function of these (and of model, seed, resolution, already above).
        payload["prior"] = {
            "prompts": _prior_prompts(cfg),
            "steps": cfg.generator.steps,
            "guidance_scale": cfg.generator.guidance_scale,
        }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def _init_lora_hash(init_lora: Path | None) -> str | None:
    if init_lora is None:
        return None
    path = Path(init_lora)
    return _sha256_file(path / LORA_WEIGHTS_NAME if path.is_dir() else path) if path.exists() else None


def _rewrite_log(path: Path, last_step: int) -> None:
    """Drop log lines of steps after the checkpoint we resume from: they are about to be redone."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    _atomic_write_text(path, "".join(f"{line}\n" for line in kept))


# --------------------------------------------------------------------------------------------------------------
# several processes (accelerate launch / torchrun): data parallel over the global batch


def _shard(size: int, num_processes: int, process_index: int) -> tuple[int, int]:
    """[lo, hi) of this process's share of a global batch of ``size``: contiguous, sizes differ by at most 1."""
    return size * process_index // num_processes, size * (process_index + 1) // num_processes


def _all_reduce_gradients(accelerator, params: list[torch.Tensor]) -> None:
    """Sum the gradients of ``params`` over processes, in one collective on one flat buffer.

    Each process's loss is its share of the global-batch mean (sum over its samples / global batch size), so
    the sum over processes is the single-process gradient. An explicit sum rather than DDP's bucketed mean:
    shares may be unequal (batch 18 on 4 processes, the short last batch of an epoch) or empty, and the LoRA
    gradient is a few MB at most, so overlapping communication with backward buys nothing.
    """
    import torch

    for p in params:
        if p.grad is None:  # a parameter no sample reached: its gradient is zero, not missing
            p.grad = torch.zeros_like(p)
    flat = accelerator.reduce(torch.cat([p.grad.reshape(-1) for p in params]), reduction="sum")
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
        offset += p.numel()


def _adapter_digest(unet) -> str:
    """sha256 over the adapter's tensors (names, dtypes, shapes and bytes), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(_adapter_state(unet).items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def _check_ranks_in_sync(accelerator, unet) -> list[str]:
    """Every process's adapter digest (process order); raise if they differ, i.e. the replicas diverged."""
    from accelerate.utils import gather_object

    digests = gather_object([_adapter_digest(unet)])
    if len(set(digests)) != 1:
        raise RuntimeError(f"LoRA weights differ across processes after training: {digests}")
    return digests


def _tracker_config(cfg: Config) -> dict[str, Any]:
    """Scalar trainer settings for the tracker's hyper-parameter table (it accepts no lists or None)."""
    values = {f"trainer.{k}": v for k, v in asdict(cfg.trainer).items()}
    values.update({"seed": cfg.seed, "generator.model": cfg.generator.model})
    return {k: v for k, v in values.items() if isinstance(v, (bool, int, float, str))}


def train_lora(
    cfg: Config,
    pairs: list[TrainPair],
    out_dir: Path,
    init_lora: Path | None = None,
    encode_cache_dir: Path | None = None,
    on_step: Callable[[int, float], None] | None = None,
    prior_dir: Path | None = None,
) -> TrainResult:
    """Fine-tune a LoRA on the UNet of ``cfg.generator.model`` and write it to ``out_dir``.

    Resumes from the newest intact checkpoint in ``out_dir/checkpoints`` written for the same setup (model,
    seed, trainer settings, pairs, init LoRA); returns at once if ``out_dir`` already holds the finished
    result of that setup. ``on_step(step, loss)`` is called after every optimizer step (and its checkpoint):
    the loop uses it for progress and stop requests (an exception raised there stops training, resumable).

    With ``trainer.prior_weight`` (beta) > 0 each step also adds beta times the denoising loss on a batch of
    base-model images of ``cfg.class_name`` (prior preservation, see ``_draw_prior``), drawn once and cached
    in ``prior_dir`` (default ``out_dir/prior``); pass the same folder to several runs to share them.

    Under ``accelerate launch --multi_gpu --num_processes P`` (or torchrun) every process takes a contiguous
    share of each global batch of ``trainer.batch_size``, gradients are summed over processes before the
    optimizer step, and only the main process writes files (LoRA, checkpoints, logs, encoding cache); see
    docs/performance.md for what matches the single-process run exactly and what only to float rounding.
    """
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, is_tensorboard_available
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params, compute_snr
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer, CLIPTextModel

    _validate(cfg, pairs)
    t = cfg.trainer
    started = time.perf_counter()
    out_dir = Path(out_dir)
    model_path = resolve_model(cfg.generator.model, cfg.model_cache)
    image_hashes = [_sha256_file(Path(p.image_path)) for p in pairs]
    fingerprint = _fingerprint(cfg, model_path, pairs, image_hashes, _init_lora_hash(init_lora))

    result_file = out_dir / RESULT_FILE
    if result_file.exists() and (out_dir / LORA_WEIGHTS_NAME).exists():
        done = json.loads(result_file.read_text(encoding="utf-8"))
        if done.get("fingerprint") == fingerprint:
            logger.info("LoRA in %s is already trained for this setup; nothing to do", out_dir)
            return TrainResult(out_dir, done["steps"], done["final_loss"], done["seconds"])

    device = torch_device(cfg)
    mixed_precision = t.mixed_precision
    if device.type == "cpu" and mixed_precision == "fp16":
        logger.warning("trainer.mixed_precision=fp16 needs a GPU; training in float32 on the CPU")
        mixed_precision = "no"
    # Multi-process training (accelerate launch / torchrun) goes through the same object; on a CPU-only box
    # `accelerate launch --cpu --num_processes 2` silently runs one process, `--multi_gpu` with cpu=True runs
    # two on gloo (FIELD-NOTES). Gradient accumulation is done by hand below (the micro-batch stream is
    # indexed by step for exact resume), so accelerate must not also divide the loss in backward().
    # TensorBoard is an optional extra: logged through accelerate's tracker only when it is importable.
    tracking = is_tensorboard_available()
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        cpu=device.type == "cpu",
        log_with="tensorboard" if tracking else None,
        project_config=ProjectConfiguration(
            project_dir=str(out_dir), logging_dir=str(out_dir / "tensorboard")
        )
        if tracking
        else None,
    )
    device = accelerator.device
    num_processes, process_index = accelerator.num_processes, accelerator.process_index
    is_main = accelerator.is_main_process
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )

    # ---- model: frozen pipeline parts, LoRA on the UNet attention projections (paper: rank 4)
    tokenizer = AutoTokenizer.from_pretrained(model_path, subfolder="tokenizer")
    # Frozen weights in the mixed-precision dtype (the trainable LoRA weights are cast back to float32 below).
    text_encoder = CLIPTextModel.from_pretrained(model_path, subfolder="text_encoder", dtype=weight_dtype)
    vae = AutoencoderKL.from_pretrained(model_path, subfolder="vae", torch_dtype=weight_dtype)
    unet = UNet2DConditionModel.from_pretrained(model_path, subfolder="unet", torch_dtype=weight_dtype)
    noise_scheduler = DDPMScheduler.from_pretrained(model_path, subfolder="scheduler")
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"{model_path}: unsupported scheduler prediction_type {prediction_type!r}")
    for module in (text_encoder, vae, unet):
        module.requires_grad_(False)
    for module in (text_encoder, vae, unet):
        module.to(device)
    text_encoder.eval()
    vae.eval()

    # ---- prior images: drawn by the base UNet, i.e. before the LoRA is added (and before any init LoRA).
    prior_pairs: list[TrainPair] = []
    prior_hashes: list[str] = []
    if t.prior_weight > 0:
        prior_root = Path(prior_dir) if prior_dir is not None else out_dir / PRIOR_DIR
        prior_key = _prior_key(cfg, model_path, weight_dtype)
        # The main process draws and writes; the others wait, then load its files.
        with accelerator.main_process_first():
            loaded = _load_prior(prior_root, prior_key)
            if loaded is not None:
                logger.info("reusing %d cached prior images from %s", len(loaded[0]), prior_root)
            elif is_main:
                loaded = _draw_prior(
                    cfg, model_path, prior_root, prior_key, vae, text_encoder, tokenizer, unet, weight_dtype
                )
            else:
                raise RuntimeError(
                    f"process {process_index}: the main process left no prior images in {prior_root}"
                )
        prior_pairs, prior_hashes = loaded

    lora_config = LoraConfig(
        r=t.rank, lora_alpha=t.alpha, init_lora_weights="gaussian", target_modules=list(t.target_modules)
    )
    # peft's gaussian init of lora_A draws from the global generator: seed it without disturbing the caller.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        unet.add_adapter(lora_config, adapter_name=ADAPTER_NAME)
    if init_lora is not None:
        _load_lora_into_adapter(unet, Path(init_lora), t.rank)
        logger.info("LoRA initialised from %s", init_lora)
    cast_training_params(unet, dtype=torch.float32)  # trainable LoRA weights stay float32 under fp16/bf16
    if t.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    # A list, not a generator: clip_grad_norm_ on an exhausted iterator silently clips nothing (FIELD-NOTES).
    params = [p for p in unet.parameters() if p.requires_grad]

    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    n = len(pairs)
    batch_size = min(t.batch_size, n)
    batches_per_epoch = math.ceil(n / batch_size)
    accum = t.gradient_accumulation_steps
    total_steps = t.max_steps or math.ceil(t.epochs * batches_per_epoch / accum)
    lr_scheduler = get_scheduler(
        t.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=t.lr_warmup_steps,
        num_training_steps=total_steps,
    )
    # The lr scheduler is stepped by hand, once per optimizer step, so it does not depend on process count.
    # The UNet is not wrapped in DDP: gradients are summed explicitly (_all_reduce_gradients says why), and
    # every replica starts from the same weights (seeded LoRA init, same init/checkpoint files).
    optimizer = accelerator.prepare(optimizer)

    # ---- resume
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_root = out_dir / CHECKPOINTS_DIR
    start_step = 0
    resumed = _latest_checkpoint(ckpt_root, fingerprint)
    if resumed is not None:
        path, state = resumed
        set_peft_model_state_dict(
            unet,
            load_file(str(path / "adapter.safetensors")),
            adapter_name=ADAPTER_NAME,
        )
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        lr_scheduler.load_state_dict(torch.load(path / "lr_scheduler.pt", weights_only=True))
        torch.set_rng_state(load_file(str(path / "rng.safetensors"))["torch_cpu"])
        start_step = state["step"]
        logger.info("resuming LoRA training from %s (step %d of %d)", path, start_step, total_steps)
    accelerator.wait_for_everyone()  # every process has read its checkpoint before the main one prunes
    if is_main:
        _rewrite_log(out_dir / TRAIN_LOG, start_step)
        # Checkpoints past the resume point are torn, corrupt or from another setup: they would only confuse
        # the rotation (and a later resume), and the steps they cover are about to be redone.
        if ckpt_root.is_dir():
            for path in ckpt_root.iterdir():
                step_of = _checkpoint_step(path)
                if path.name.startswith(".step-") or (step_of is not None and step_of > start_step):
                    shutil.rmtree(path, ignore_errors=True)

    # ---- data
    encoder = _Encoder(model_path, vae, text_encoder, tokenizer, t.resolution, device, weight_dtype)
    cache = None
    if t.cache_latents and start_step < total_steps:
        cache_dir = Path(encode_cache_dir) if encode_cache_dir is not None else None
        # With a cache folder the main process encodes and writes first, the others then load its files
        # (bit-identical to its in-memory tensors); without one, every process encodes for itself.
        with accelerator.main_process_first() if cache_dir is not None else nullcontext():
            cache = _EncodingCache(
                encoder, pairs, image_hashes, t.random_flip, cache_dir, batch_size, write=is_main
            )
    prior_cache = None
    if prior_pairs and t.cache_latents and start_step < total_steps:
        with accelerator.main_process_first() if cache_dir is not None else nullcontext():
            prior_cache = _EncodingCache(
                encoder, prior_pairs, prior_hashes, t.random_flip, cache_dir, batch_size, write=is_main
            )
    # Per-sample latent shape, for drawing the whole global batch's noise on every process.
    downscale = 2 ** (len(vae.config.block_out_channels) - 1)
    latent_shape = (vae.config.latent_channels, t.resolution // downscale, t.resolution // downscale)
    weights = torch.tensor(_loss_weights(pairs, t.reward_weighted))
    scaling_factor = vae.config.scaling_factor
    permutations: dict[int, list[int]] = {}

    def micro_batch(m: int) -> list[int]:
        epoch, position = divmod(m, batches_per_epoch)
        if epoch not in permutations:
            permutations[epoch] = torch.randperm(n, generator=_generator(cfg.seed, 0, epoch)).tolist()
        return permutations[epoch][position * batch_size : (position + 1) * batch_size]

    # The prior set runs its own epochs (its size differs from the pairs'), ordered by (seed, 3, epoch).
    n_prior = len(prior_pairs)
    prior_batch_size = min(batch_size, n_prior) if n_prior else 0
    prior_batches_per_epoch = math.ceil(n_prior / prior_batch_size) if n_prior else 0
    prior_permutations: dict[int, list[int]] = {}

    def prior_micro_batch(m: int) -> list[int]:
        epoch, position = divmod(m, prior_batches_per_epoch)
        if epoch not in prior_permutations:
            order = torch.randperm(n_prior, generator=_generator(cfg.seed, 3, epoch)).tolist()
            prior_permutations[epoch] = order
        return prior_permutations[epoch][position * prior_batch_size : (position + 1) * prior_batch_size]

    def draws(g: torch.Generator, size: int):
        """Flips, latent sample, noise and timesteps of a batch, in a fixed order (see the loop)."""
        flips = (torch.rand(size, generator=g) < 0.5).tolist() if t.random_flip else [False] * size
        latent_draw = torch.randn((size, *latent_shape), generator=g)
        noise = torch.randn((size, *latent_shape), generator=g)
        if t.noise_offset:
            noise = noise + t.noise_offset * torch.randn((size, latent_shape[0], 1, 1), generator=g)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (size,), generator=g)
        return flips, latent_draw, noise, timesteps

    def denoising_loss(
        data, source, cached, mine, lo, hi, flips, latent_draw, noise, timesteps, weights, size
    ):
        """This process's share of the (weighted) global-batch mean of the denoising loss on ``mine``."""
        if cached is not None:
            mean, std, text = cached.batch(mine, flips[lo:hi])
        else:
            mean, std = encoder.latent_distribution([data[i].image_path for i in mine], flips[lo:hi])
            text = encoder.text_embeddings([data[i].prompt for i in mine])
        if tuple(mean.shape[1:]) != latent_shape:
            raise RuntimeError(
                f"VAE latents of the {source} are {tuple(mean.shape[1:])}, expected {latent_shape}"
            )
        latents = ((mean + std * latent_draw[lo:hi]) * scaling_factor).to(device)
        noise_mine = noise[lo:hi].to(device)
        t_mine = timesteps[lo:hi].to(device)
        text = text.to(device, weight_dtype)

        noisy = noise_scheduler.add_noise(latents, noise_mine, t_mine)
        if prediction_type == "epsilon":
            target = noise_mine
        else:
            target = noise_scheduler.get_velocity(latents, noise_mine, t_mine)
        with accelerator.autocast():
            pred = unet(noisy.to(weight_dtype), t_mine, text, return_dict=False)[0]
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        sample_weights = weights.to(device)
        if t.snr_gamma is not None:
            snr = compute_snr(noise_scheduler, t_mine)
            sample_weights = sample_weights * min_snr_weight(snr, t.snr_gamma, prediction_type)
        # This process's part of the global-batch mean; summed over processes it is that mean.
        return (per_sample * sample_weights).sum() / size

    # ---- loop
    log_file = out_dir / TRAIN_LOG
    if tracking:
        accelerator.init_trackers("lora", config=_tracker_config(cfg))
    # Steps, loss, lr and ETA (tqdm's remaining-time estimate) on the main process only.
    progress = tqdm(total=total_steps, initial=start_step, desc="LoRA", unit="step", disable=not is_main)
    loss_value = float("nan")
    for step in range(start_step, total_steps):
        lr = lr_scheduler.get_last_lr()[0]
        step_loss = 0.0
        step_fidelity = step_prior = 0.0
        for micro in range(accum):
            indices = micro_batch(step * accum + micro)
            size = len(indices)
            # The order of draws is fixed and covers the whole global batch on every process, each then
            # keeping its slice: a sample gets the same flip, latent draw, noise and timestep whatever the
            # process count, and the cached and uncached paths consume identical random numbers.
            flips, latent_draw, noise, timesteps = draws(_generator(cfg.seed, 1, step, micro), size)
            lo, hi = _shard(size, num_processes, process_index)
            mine = indices[lo:hi]
            # The prior batch draws from its own generator, so the fidelity term's numbers are the same with
            # and without it (the prior_weight = 0 run's loss is this run's fidelity_loss).
            if n_prior:
                prior_indices = prior_micro_batch(step * accum + micro)
                prior_size = len(prior_indices)
                prior_draws = draws(_generator(cfg.seed, 4, step, micro), prior_size)
                plo, phi = _shard(prior_size, num_processes, process_index)
                prior_mine = prior_indices[plo:phi]
            else:
                prior_mine = []
            if not mine and not prior_mine:
                # More processes than samples in this batch: a zero loss still gives every parameter a
                # (zero) gradient, so the collective below and a GradScaler see the same thing everywhere.
                accelerator.backward(sum(p.sum() for p in params) * 0.0)
                continue
            loss = torch.zeros((), device=device)
            if mine:
                fidelity = denoising_loss(
                    pairs,
                    "pairs",
                    cache,
                    mine,
                    lo,
                    hi,
                    flips,
                    latent_draw,
                    noise,
                    timesteps,
                    weights[mine],
                    size,
                )
                loss = fidelity
                step_fidelity += fidelity.detach().item() / accum
            if prior_mine:
                # Lee et al. 2023, eq. 2: total = fidelity + beta * (unweighted) loss on the prior images.
                prior = denoising_loss(
                    prior_pairs,
                    "prior images",
                    prior_cache,
                    prior_mine,
                    plo,
                    phi,
                    *prior_draws,
                    torch.ones(len(prior_mine)),
                    prior_size,
                )
                loss = loss + t.prior_weight * prior
                step_prior += prior.detach().item() / accum
            accelerator.backward(loss / accum)
            step_loss += loss.detach().item() / accum
        if num_processes > 1:
            _all_reduce_gradients(accelerator, params)
            step_loss, step_fidelity, step_prior = accelerator.reduce(
                torch.tensor([step_loss, step_fidelity, step_prior], dtype=torch.float64, device=device)
            ).tolist()
        if t.max_grad_norm and t.max_grad_norm > 0:
            accelerator.clip_grad_norm_(params, t.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        loss_value = step_loss
        progress.update(1)
        progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
        record = {"step": done, "loss": loss_value, "lr": lr}
        if n_prior:
            # loss = fidelity_loss + prior_weight * prior_loss (prior_loss unweighted).
            record.update(fidelity_loss=step_fidelity, prior_loss=step_prior)
        if tracking:
            accelerator.log({k: v for k, v in record.items() if k != "step"}, step=done)
        if is_main:
            with open(log_file, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if t.checkpoint_every and done % t.checkpoint_every == 0 and done < total_steps:
                state = {
                    "step": done,
                    "fingerprint": fingerprint,
                    "micro_batches_done": done * accum,
                    "epoch": (done * accum) // batches_per_epoch,
                    "batch_in_epoch": (done * accum) % batches_per_epoch,
                    "seed": cfg.seed,
                    "loss": loss_value,
                }
                _write_checkpoint(
                    ckpt_root,
                    done,
                    _adapter_state(unet),
                    optimizer,
                    lr_scheduler,
                    state,
                    t.checkpoints_kept,
                )
        if on_step is not None:
            on_step(done, loss_value)
    progress.close()
    if tracking:
        # Not accelerator.end_training(): it also destroys the process group, which the caller may reuse.
        for tracker in accelerator.trackers:
            tracker.finish()

    if resumed is not None and start_step >= total_steps:
        loss_value = float(resumed[1].get("loss", float("nan")))
    # The replicas never exchange weights, only gradients: check they really ended identical.
    rank_digests = _check_ranks_in_sync(accelerator, unet) if num_processes > 1 else None
    seconds = time.perf_counter() - started
    if is_main:
        save_lora(unet, out_dir)
        result = {
            "fingerprint": fingerprint,
            "steps": total_steps,
            "final_loss": loss_value,
            "seconds": seconds,
            "num_processes": num_processes,
        }
        if rank_digests is not None:
            result["rank_adapter_sha256"] = rank_digests
        _atomic_write_text(result_file, json.dumps(result, indent=1))
    accelerator.wait_for_everyone()
    logger.info(
        "LoRA trained: %d steps, final loss %.4f, %.1f s -> %s", total_steps, loss_value, seconds, out_dir
    )
    return TrainResult(lora_dir=out_dir, steps=total_steps, final_loss=loss_value, seconds=seconds)
