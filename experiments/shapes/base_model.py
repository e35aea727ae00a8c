"""The base text-to-image model of the shapes world, trained here on rendered scenes in minutes on a CPU.

It is the real SD 2.x pipeline at toy size (CLIPTokenizer + CLIPTextModel, UNet2DConditionModel with
cross-attention, AutoencoderKL, DDIM scheduler), saved with ``save_pretrained`` and loaded by
``StableDiffusionPipeline.from_pretrained`` like any checkpoint, so the loop's generator, LoRA trainer and
evaluator run on it unchanged.

Training, in two phases on freshly rendered 64 px scenes:
1. the VAE (3 blocks: a 64 px image becomes a 4x16x16 latent) learns to reconstruct scenes;
2. the UNet and the text encoder learn the denoising objective on the VAE's latents of captioned scenes.

The deliberate weaknesses (what the loop is meant to fix), both the kind of error web captions make:
1. the targeted one, a mis-captioned class-colour binding: scenes captioned "purple circle(s)" show purple
   circles only with probability ``weak_binding_shown``; the others show circles of another colour, so the
   base draws a purple circle for a purple-circle prompt in only a fraction of samples, and a judge that
   reads colours can pick those (the loop's premise: best-of-ten can reach what the base draws rarely);
2. a second targeted one of another kind, a rare class-colour binding: scenes of ``rare_binding`` are kept
   only with probability ``rare_binding_kept`` (the others are replaced by scenes of other combinations), so
   the captions are right but the base has seen the combination a few dozen times (web data is thin on rare
   combinations, not only noisy); both words are common on their own;
3. a secondary one: with probability ``count_label_noise`` a caption carries the wrong count word (Lee et
   al. 2023 report that Stable Diffusion gets counts wrong but colours and backgrounds right).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from experiments.shapes import world

if TYPE_CHECKING:
    import torch
    from transformers import CLIPTokenizer

logger = logging.getLogger(__name__)

# Bumped when the recipe or the training code changes what is trained, so a cached model is rebuilt, not
# trusted. 4: transformers' warm-up + cosine schedule (lr 0 at step 0, the cosine starting after the warm-up)
# replaced a hand-written one. diffusers' EMAModel, which replaced a hand-written EMA at the same time, gives
# the same weights bit for bit (its first step copies instead of averaging; that is gone within ~50 steps).
# 5: counts one and two only; the purple-circle binding mis-captioned; count label noise 0.25.
# 6: objects 1.4x larger (a shape spans several latent pixels).
# 7: a second targeted weakness, the rare green-circle binding.
VERSION = "7"
MAX_LENGTH = 16  # tokens: the longest caption of the grammar is 10 with BOS/EOS; CLIP would use 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
VAE_CROP = 32
EXTRA_WORDS = ("a", "an", "on", "with", "against", "background", "of", "in", "the", "and", "shapes", "shape")


@dataclass
class BaseModelConfig:
    """How the base model is trained. Defaults: about 20 minutes on 2 idle CPU cores (docs/proof.md)."""

    seed: int = 0
    images: int = 12000  # rendered training scenes (each drawn with a fresh random layout)
    vae_steps: int = 1500
    vae_batch_size: int = 32
    vae_learning_rate: float = 2e-3
    unet_steps: int = 5000
    unet_batch_size: int = 32
    unet_learning_rate: float = 1e-3
    # A 16x16 latent under SD's schedule keeps 6.8% of the signal at the last timestep, as much as the mean
    # of the initial noise varies: the model learnt to read the background from that leak, and sampling
    # from pure noise then drew a random background whatever the prompt said. A zero-terminal-SNR schedule
    # with v-prediction (Lin et al. 2024) removes the leak.
    prediction_type: str = "v_prediction"
    zero_terminal_snr: bool = True
    # Min-SNR-gamma loss weighting (Hang et al. 2023; 0 = off). Off by default: under v-prediction with a
    # zero terminal SNR it gives the pure-noise timestep, where the layout is decided, zero weight.
    min_snr_gamma: float = 0.0
    # Exponential moving average of the weights, what the saved model gets (0 = off): small diffusion models
    # sample much cleaner shapes from their EMA weights than from the last step's.
    ema_decay: float = 0.999
    caption_dropout: float = 0.1  # empty captions, so classifier-free guidance works
    count_label_noise: float = 0.25  # the secondary weakness, see the module docstring
    # The targeted weakness: "class:colour", and how often a scene captioned with it shows it.
    weak_binding: str = "circle:purple"
    weak_binding_shown: float = 0.25
    # The second targeted weakness: "class:colour", and the share of its scenes kept in the data (~30 of
    # 12,000 scenes at 0.05, against ~100 for every other combination of the class in that colour).
    rare_binding: str = "circle:green"
    rare_binding_kept: float = 0.05
    # CPU results depend on the thread count (reduction order): a fixed count makes the model the same on
    # every machine of the same kind. Two threads: a UNet step took 0.25 s against 0.34 s with one on an idle
    # machine; on a busy one, two OpenMP threads waiting on each other can be far slower than one.
    threads: int = 2


# --------------------------------------------------------------------------------------------------------------
# parts


def vocabulary() -> list[str]:
    words = list(world.COUNT_WORDS.values()) + list(world.COLOURS) + list(world.BACKGROUNDS)
    words += list(world.CLASSES) + list(world.PLURALS.values()) + list(EXTRA_WORDS)
    return list(dict.fromkeys(words))


def build_tokenizer() -> CLIPTokenizer:
    """A CLIPTokenizer over the grammar's words: one token per word (merges spell each word out), plus the
    byte-level characters, so any other text still tokenizes (character by character)."""
    from transformers import CLIPTokenizer

    from ccsr.tiny.sd import byte_chars

    chars = byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + [BOS, EOS]
    merges: list[tuple[str, str]] = []

    def make(tokens, merges):
        vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
        return CLIPTokenizer(vocab=vocab, merges=list(dict.fromkeys(merges)), model_max_length=MAX_LENGTH)

    # BPE applies the best-ranked merge first, so one word's merges can split another ("r e" of "red" inside
    # "green"): add merges for what each word still splits into, after the existing ones, until none splits.
    tokenizer = make(tokens, merges)
    for _ in range(20):
        split = [tokenizer.tokenize(w) for w in vocabulary()]
        split = [pieces for pieces in split if len(pieces) > 1]
        if not split:
            return tokenizer
        for pieces in split:
            current = pieces[0]
            for piece in pieces[1:]:
                merges.append((current, piece))
                current += piece
                tokens.insert(-2, current)
        tokenizer = make(tokens, merges)
    raise RuntimeError("tokenizer: could not make every grammar word a single token")


def build_parts(tokenizer, seed: int):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_LENGTH,
            projection_dim=64,
            hidden_act="gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=world.SIZE,
    )
    unet = UNet2DConditionModel(
        sample_size=world.SIZE // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        # Attention at 8x8 and 4x4 only: at 16x16 it costs more than it helps (counting is a global task).
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=4,
        use_linear_projection=True,
        norm_num_groups=32,
    )
    return text_encoder, vae, unet


def noisy_caption(scene: world.Scene, rng: random.Random, noise: float) -> str:
    """The scene's caption, with a wrong count word with probability ``noise`` (the deliberate weakness)."""
    if rng.random() >= noise:
        return scene.caption
    wrong = rng.choice([n for n in world.COUNTS if n != scene.spec.count])
    spec = world.SceneSpec(scene.spec.shape, wrong, scene.spec.colour, scene.spec.background)
    return world.caption(spec, world.TEMPLATES.index(_template_of(scene)))


def _template_of(scene: world.Scene) -> str:
    for i, template in enumerate(world.TEMPLATES):
        if world.caption(scene.spec, i) == scene.caption:
            return template
    raise ValueError(f"caption not from the grammar: {scene.caption!r}")


def _binding(text: str, key: str) -> tuple[str, str]:
    shape, _, colour = text.partition(":")
    if shape not in world.CLASSES or colour not in world.COLOURS:
        raise ValueError(f"{key} must be 'class:colour' of the world, got {text!r}")
    return shape, colour


def weak_binding(cfg: BaseModelConfig) -> tuple[str, str]:
    return _binding(cfg.weak_binding, "weak_binding")


def rare_binding(cfg: BaseModelConfig) -> tuple[str, str]:
    return _binding(cfg.rare_binding, "rare_binding")


def drawn_spec(specs: list[world.SceneSpec], rng: random.Random, cfg: BaseModelConfig) -> world.SceneSpec:
    """A training scene's combination: uniform over ``specs``, except that the rare binding's are kept only
    with probability ``cfg.rare_binding_kept`` (otherwise another combination is drawn instead)."""
    shape, colour = rare_binding(cfg)
    spec = rng.choice(specs)
    if spec.shape == shape and spec.colour == colour and rng.random() >= cfg.rare_binding_kept:
        spec = rng.choice([s for s in specs if not (s.shape == shape and s.colour == colour)])
    return spec


def shown_spec(spec: world.SceneSpec, rng: random.Random, cfg: BaseModelConfig) -> world.SceneSpec:
    """What a scene captioned ``spec`` really shows: ``spec`` itself, except for the weak binding, which is
    shown only with probability ``cfg.weak_binding_shown`` and otherwise in another colour, chosen uniformly
    among those of neither binding (so the rare binding stays rare in the pixels too, not only in captions)."""
    shape, colour = weak_binding(cfg)
    if spec.shape != shape or spec.colour != colour or rng.random() < cfg.weak_binding_shown:
        return spec
    rare_shape, rare_colour = rare_binding(cfg)
    excluded = {colour} | ({rare_colour} if rare_shape == shape else set())
    other = rng.choice([c for c in world.COLOURS if c not in excluded])
    return world.SceneSpec(spec.shape, spec.count, other, spec.background)


def render_dataset(
    n: int, seed: int, cfg: BaseModelConfig
) -> tuple[np.ndarray, list[str], list[world.SceneSpec]]:
    """``n`` scenes over every class and combination (held-out ones included: they are pre-training data,
    held out only from the loop's prompts), their captions (miscounted with probability
    ``cfg.count_label_noise``; the weak binding's captions mostly wrong in colour, the rare binding rare), and
    what they really show."""
    rng = random.Random(f"base-data:{seed}")
    specs = [s for shape in world.CLASSES for s in world.all_specs(shape)]
    pixels = np.empty((n, world.SIZE, world.SIZE, 3), dtype=np.uint8)
    captions, truths = [], []
    for i in range(n):
        scene = world.random_scene(drawn_spec(specs, rng, cfg), rng)
        truth = shown_spec(scene.spec, rng, cfg)
        pixels[i] = np.asarray(world.render(truth, scene.objects))
        captions.append(noisy_caption(scene, rng, cfg.count_label_noise))
        truths.append(truth)
    return pixels, captions, truths


# --------------------------------------------------------------------------------------------------------------
# training


def _to_tensor(pixels: np.ndarray):
    import torch

    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_vae(vae, pixels: np.ndarray, cfg: BaseModelConfig) -> float:
    """Reconstruction (L1 + MSE) with a tiny KL term; returns the final reconstruction loss."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.vae_learning_rate, total_steps=cfg.vae_steps)
    vae.train()
    loss_value = float("nan")
    for step in range(cfg.vae_steps):
        idx = torch.randint(0, len(pixels), (cfg.vae_batch_size,), generator=g)
        # Random 32 px crops: the VAE is convolutional, so it learns edges and colours 4x cheaper per image.
        top, left = torch.randint(0, world.SIZE - VAE_CROP + 1, (2,), generator=g).tolist()
        x = _to_tensor(pixels[idx.numpy(), top : top + VAE_CROP, left : left + VAE_CROP])
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        recon = vae.decode(z).sample
        rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        loss = rec + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(vae.parameters()), 1.0)
        opt.step()
        sched.step()
        loss_value = rec.item()
        if step % 100 == 0 or step == cfg.vae_steps - 1:
            logger.info("vae step %d/%d: reconstruction loss %.4f", step + 1, cfg.vae_steps, loss_value)
    vae.eval()
    return loss_value


def reconstruction_accuracy(vae, pixels: np.ndarray, truths: list[world.SceneSpec]) -> float:
    """Share of VAE round trips that the world's measurement still reads as the scene's exact spec."""
    import torch
    from PIL import Image

    with torch.no_grad():
        recon = vae.decode(vae.encode(_to_tensor(pixels)).latent_dist.mean).sample
    recon = ((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    hits = [
        world.accuracy(t, world.measure(Image.fromarray(r))).exact for r, t in zip(recon, truths, strict=True)
    ]
    return round(sum(hits) / len(hits), 4)


def encode_latents(vae, pixels: np.ndarray, batch_size: int = 256):
    """(mean, std) of the VAE posterior of every image, computed once: the UNet steps then draw latents from
    them instead of running the VAE encoder on every batch."""
    import torch

    means, stds = [], []
    with torch.no_grad():
        for start in range(0, len(pixels), batch_size):
            dist = vae.encode(_to_tensor(pixels[start : start + batch_size])).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


@dataclass
class CaptionIds:
    """Token ids of every training caption and of the empty caption (classifier-free guidance's dropout)."""

    ids: torch.Tensor
    empty: torch.Tensor

    @classmethod
    def of(cls, tokenizer, captions: list[str]) -> CaptionIds:
        def tokenize(texts):
            return tokenizer(
                texts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
            ).input_ids

        return cls(ids=tokenize(captions), empty=tokenize([""])[0])


def denoising_loss(unet, text_encoder, noise_scheduler, latents, ids, g, cfg: BaseModelConfig):
    """SD's objective on one batch: predict the noise (epsilon) or the velocity (v) of a random timestep,
    optionally Min-SNR weighted."""
    import torch
    import torch.nn.functional as F
    from diffusers.training_utils import compute_snr

    from ccsr.trainer import min_snr_weight

    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),), generator=g)
    noisy = noise_scheduler.add_noise(latents, noise, t)
    pred = unet(noisy, t, text_encoder(ids)[0]).sample
    if cfg.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, t)
    else:
        target = noise
    per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
    if cfg.min_snr_gamma > 0:
        snr = compute_snr(noise_scheduler, t)
        per_sample = per_sample * min_snr_weight(snr, cfg.min_snr_gamma, cfg.prediction_type)
    return per_sample.mean()


def train_unet(
    unet, text_encoder, tokenizer, means, stds, captions, scaling_factor, cfg: BaseModelConfig, on_step=None
):
    """The SD denoising objective on cached latents; the text encoder trains too. The models end with their
    EMA weights if ``cfg.ema_decay`` is set (diffusers' ``EMAModel``: decay (1 + s) / (10 + s) capped at
    ``ema_decay``, the first step copied). ``on_step(step, ema)`` is called after every optimizer step (models
    in train mode, ``ema`` the EMAModel or None). Returns the mean loss of the last 250 steps."""
    import torch
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    from ccsr.tiny.sd import sd2_scheduler

    noise_scheduler = DDPMScheduler.from_config(
        sd2_scheduler(cfg.prediction_type, cfg.zero_terminal_snr).config
    )
    g = torch.Generator().manual_seed(cfg.seed + 1)
    rng = random.Random(f"dropout:{cfg.seed}")
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_learning_rate, weight_decay=1e-2)
    # Linear warm-up, then a half cosine down to a tenth of the peak learning rate.
    warmup = min(200, cfg.unet_steps // 10 + 1)
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, cfg.unet_steps, min_lr_rate=0.1)
    captions_ids = CaptionIds.of(tokenizer, captions)
    ema = EMAModel(params, decay=cfg.ema_decay, foreach=True) if cfg.ema_decay > 0 else None
    unet.train()
    text_encoder.train()
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(cfg.unet_steps):
        idx = torch.randint(0, len(captions), (cfg.unet_batch_size,), generator=g)
        latents = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=g)) * scaling_factor
        ids = captions_ids.ids[idx].clone()
        for row in range(len(idx)):
            if rng.random() < cfg.caption_dropout:
                ids[row] = captions_ids.empty
        loss = denoising_loss(unet, text_encoder, noise_scheduler, latents, ids, g, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if ema is not None:
            ema.step(params)
        if on_step is not None:
            on_step(step + 1, ema)
        if step % 250 == 0 or step == cfg.unet_steps - 1:
            elapsed = time.perf_counter() - start
            logger.info(
                "unet step %d/%d: loss %.4f (%.0f s)", step + 1, cfg.unet_steps, _recent(losses), elapsed
            )
    if ema is not None:
        ema.copy_to(params)
    unet.eval()
    text_encoder.eval()
    return _recent(losses)


def _recent(losses: list[float]) -> float:
    return sum(losses[-250:]) / len(losses[-250:])


def train_base_model(out_dir: Path, cfg: BaseModelConfig | None = None) -> dict:
    """Render scenes, train the VAE then the UNet and text encoder, save a StableDiffusionPipeline folder.
    Trains with ``cfg.threads`` torch threads and gives the caller its own thread count back."""
    from ccsr.devices import keep_cpu_threads

    with keep_cpu_threads():
        return _train_base_model(Path(out_dir), cfg or BaseModelConfig())


def _train_base_model(out_dir: Path, cfg: BaseModelConfig) -> dict:
    import json

    import torch

    from ccsr.tiny.sd import save_sd2_pipeline

    torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    tokenizer = build_tokenizer()
    text_encoder, vae, unet = build_parts(tokenizer, cfg.seed)
    pixels, captions, truths = render_dataset(cfg.images, cfg.seed, cfg)
    t_data = time.perf_counter() - started
    logger.info("rendered %d scenes in %.0f s", len(pixels), t_data)
    torch.manual_seed(cfg.seed)
    vae_loss = train_vae(vae, pixels, cfg)
    t_vae = time.perf_counter() - started - t_data
    recon_exact = reconstruction_accuracy(vae, pixels[:200], truths[:200])
    logger.info("VAE reconstructions measured all right: %.1f%%", 100 * recon_exact)
    means, stds = encode_latents(vae, pixels)
    # SD scales latents to unit variance (0.18215 for SD's VAE); this VAE's factor is measured the same way.
    scaling_factor = float(1.0 / means.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    unet_loss = train_unet(unet, text_encoder, tokenizer, means, stds, captions, scaling_factor, cfg)
    t_unet = time.perf_counter() - started - t_data - t_vae
    out_dir = Path(out_dir)
    save_sd2_pipeline(out_dir, vae, text_encoder, tokenizer, unet, cfg.prediction_type, cfg.zero_terminal_snr)
    info = {
        "config": asdict(cfg),
        "vae_reconstruction_loss": round(vae_loss, 5),
        "vae_reconstruction_exact": recon_exact,
        "unet_loss": round(unet_loss, 5),
        "scaling_factor": scaling_factor,
        "seconds": {"render": round(t_data, 1), "vae": round(t_vae, 1), "unet": round(t_unet, 1)},
    }
    (out_dir / "shapes_base_model.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
    logger.info("base model saved to %s: %s", out_dir, info)
    return info


def model_dir(cache_dir: str | Path | None = None) -> Path:
    """Where the default-recipe base model lives (built or not): ``<cache>/shapes-sd-v<VERSION>``, the cache
    being ``cache_dir``, else the one of the embedded tiny models (``$CCSR_CACHE``)."""
    from ccsr.models import default_cache_dir

    return Path(cache_dir or default_cache_dir()) / f"shapes-sd-v{VERSION}"


def cached_base_model(cache_dir: str | Path | None = None) -> Path:
    """The default-recipe base model's folder, trained into it first if it is not there (~25 min). Processes
    that ask at the same time wait on a file lock; the folder appears whole (built beside it, then renamed)."""
    from ccsr.models import build_once

    def build(folder: Path) -> None:
        logger.info("training the shapes base model into %s", model_dir(cache_dir))
        train_base_model(folder, BaseModelConfig())

    return build_once(model_dir(cache_dir), build, VERSION)


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="train the shapes-world base model into a folder")
    parser.add_argument("out_dir", type=Path)
    for f, v in asdict(BaseModelConfig()).items():
        kind = _parse_bool if isinstance(v, bool) else type(v)
        parser.add_argument(f"--{f.replace('_', '-')}", type=kind, default=v)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = BaseModelConfig(**{f: getattr(args, f) for f in asdict(BaseModelConfig())})
    train_base_model(args.out_dir, cfg)


if __name__ == "__main__":
    main()
