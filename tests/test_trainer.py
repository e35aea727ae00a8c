"""LoRA trainer on the real tiny SD: cached == uncached, resume == uninterrupted, targets, loading."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ccsr.config import Config
from ccsr.rundir import LORA_WEIGHTS_NAME
from ccsr.seeds import seeded_generator
from ccsr.train import train_lora
from ccsr.training_data import TrainPair
from tests import helpers
from tests.helpers import Interrupt, lora_tensors, max_diff, read_log

RESOLUTION = 32  # the VAE downsamples 8x: 4x4 latents, enough for the UNet's one down block


@pytest.fixture(scope="session")
def sd_models(tmp_path_factory) -> dict[str, Path]:
    from ccsr.tiny.sd import build_stable_diffusion

    root = tmp_path_factory.mktemp("sd")
    models = {}
    for prediction_type in ("epsilon", "v_prediction"):
        out = root / prediction_type
        build_stable_diffusion(out, seed=0, prediction_type=prediction_type)
        models[prediction_type] = out
    return models


@pytest.fixture(scope="session")
def pairs(tmp_path_factory) -> list[TrainPair]:
    """Eight noise images of mixed sizes and aspect ratios (the resize + center crop is exercised)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    sizes = [(48, 32), (32, 40), (32, 32), (64, 48)]
    out = []
    for i in range(8):
        w, h = sizes[i % len(sizes)]
        path = root / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        out.append(
            TrainPair(prompt=f"a photo of a red object number {i}", image_path=path, score=float(i % 4))
        )
    return out


def make_cfg(model: Path, **trainer) -> Config:
    defaults = {"resolution": RESOLUTION, "batch_size": 4, "max_steps": 4, "learning_rate": 1e-3}
    return helpers.make_cfg(model, **{**defaults, **trainer})


# -------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def reference_run(sd_models, pairs, tmp_path_factory) -> Path:
    """An uninterrupted 6-step run with checkpoints every 2 steps: the baseline of the resume tests."""
    out = tmp_path_factory.mktemp("reference")
    cfg = make_cfg(sd_models["epsilon"], max_steps=6, checkpoint_every=2)
    train_lora(cfg, pairs, out)
    return out


def test_cached_and_uncached_paths_agree(sd_models, pairs, tmp_path, caplog):
    cache_dir = tmp_path / "encodings"
    cached = train_lora(
        make_cfg(sd_models["epsilon"], max_steps=3), pairs, tmp_path / "c", encode_cache_dir=cache_dir
    )
    uncached = train_lora(
        make_cfg(sd_models["epsilon"], max_steps=3, cache_latents=False), pairs, tmp_path / "u"
    )
    # Same batches, flips, latent samples, noise and timesteps: the losses and the LoRA agree to float noise.
    losses_c = [r["loss"] for r in read_log(cached.lora_dir)]
    losses_u = [r["loss"] for r in read_log(uncached.lora_dir)]
    np.testing.assert_allclose(losses_c, losses_u, rtol=1e-5)
    # The VAE sees different batch compositions on the two paths (float noise ~1e-7), which Adam's
    # normalised update can lift to ~1e-6 on near-zero gradients.
    assert max_diff(lora_tensors(cached.lora_dir), lora_tensors(uncached.lora_dir)) < 1e-5
    # One latent file (both flips) per image and one text file per caption, reused by a later run.
    assert len(list(cache_dir.glob("latent-*.safetensors"))) == len(pairs)
    assert len(list(cache_dir.glob("text-*.safetensors"))) == len(pairs)
    with caplog.at_level(logging.INFO, logger="ccsr"):
        again = train_lora(
            make_cfg(sd_models["epsilon"], max_steps=3), pairs, tmp_path / "c2", encode_cache_dir=cache_dir
        )
    assert "0/8 images and 0/8 captions to encode" in caplog.text
    assert max_diff(lora_tensors(again.lora_dir), lora_tensors(cached.lora_dir)) == 0.0


def test_flip_uses_its_own_encoding(sd_models, pairs, tmp_path):
    """With flips off, the same seed gives a different run: the flip really reaches the latents."""
    flipped = train_lora(make_cfg(sd_models["epsilon"], max_steps=1), pairs, tmp_path / "f")
    plain = train_lora(make_cfg(sd_models["epsilon"], max_steps=1, random_flip=False), pairs, tmp_path / "p")
    assert read_log(flipped.lora_dir)[0]["loss"] != read_log(plain.lora_dir)[0]["loss"]


def test_resume_after_interruption_equals_uninterrupted(sd_models, pairs, reference_run, tmp_path):
    cfg = make_cfg(sd_models["epsilon"], max_steps=6, checkpoint_every=2)

    def stop_at_5(step: int, loss: float) -> None:
        if step == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_lora(cfg, pairs, tmp_path, on_step=stop_at_5)
    assert not (tmp_path / LORA_WEIGHTS_NAME).exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2", "step-4"]
    result = train_lora(cfg, pairs, tmp_path)
    assert result.steps == 6
    assert max_diff(lora_tensors(tmp_path), lora_tensors(reference_run)) < 1e-6
    # Steps 5 (logged before the crash) and 6 were redone from step 4, and logged once.
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(
        [r["loss"] for r in read_log(tmp_path)], [r["loss"] for r in read_log(reference_run)], rtol=1e-6
    )


def test_a_stop_request_is_honoured_after_the_step_in_flight_and_resumes_exactly(
    sd_models, pairs, reference_run, tmp_path
):
    from ccsr.distributed import StopRequested

    cfg = make_cfg(sd_models["epsilon"], max_steps=6, checkpoint_every=2)
    asked = []

    def stop_after_3() -> bool:
        asked.append(True)
        return len(asked) == 3

    with pytest.raises(StopRequested):
        train_lora(cfg, pairs, tmp_path, should_stop=stop_after_3)
    assert len(asked) == 3  # asked after every step, not only at a checkpoint
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2", "step-3"]
    assert not (tmp_path / LORA_WEIGHTS_NAME).exists()
    train_lora(cfg, pairs, tmp_path)
    assert max_diff(lora_tensors(tmp_path), lora_tensors(reference_run)) < 1e-6
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3, 4, 5, 6]


def test_fp16_loss_scale_survives_a_checkpoint(sd_models, pairs, tmp_path):
    """accelerate's GradScaler (fp16 on a GPU) is checkpointed and restored; on the CPU one stands in for it."""
    from ccsr.train import build_trainer, make_job
    from ccsr.trainer import LoRATrainer

    cfg = make_cfg(sd_models["epsilon"])
    job = make_job(cfg, pairs, tmp_path)

    def trainer() -> LoRATrainer:
        built = build_trainer(cfg, job)
        assert built.accelerator.scaler is None  # float32 on the CPU
        built.accelerator.scaler = torch.amp.GradScaler("cpu")
        return built

    first = trainer()
    # Where a run gets after overflows: backed off to 2**11, 7 good steps towards the next growth.
    reached = {"scale": 2048.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 100}
    first.accelerator.scaler.load_state_dict({**reached, "_growth_tracker": 7})
    first.checkpoint(2, 0.5)
    assert (tmp_path / "checkpoints" / "step-2" / "grad_scaler.pt").exists()
    second = trainer()
    assert second.accelerator.scaler.state_dict()["scale"] == 65536.0
    assert second.resume()[0] == 2
    assert second.accelerator.scaler.state_dict() == {**reached, "_growth_tracker": 7}


def test_torn_and_corrupt_checkpoints_are_skipped(sd_models, pairs, reference_run, tmp_path, caplog):
    cfg = make_cfg(sd_models["epsilon"], max_steps=6, checkpoint_every=2, checkpoints_kept=3)

    def stop_at_5(step: int, loss: float) -> None:
        if step == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_lora(cfg, pairs, tmp_path, on_step=stop_at_5)
    ckpts = tmp_path / "checkpoints"
    # step-4 corrupted after it was committed; step-5 torn mid-write (no complete.json).
    adapter = ckpts / "step-4" / "adapter.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-8] + b"\0" * 8)
    shutil.copytree(ckpts / "step-2", ckpts / "step-5")
    (ckpts / "step-5" / "complete.json").unlink()
    with caplog.at_level(logging.INFO, logger="ccsr"):
        train_lora(cfg, pairs, tmp_path)
    assert "skipping checkpoint" in caplog.text and "step-5" in caplog.text and "checksum" in caplog.text
    assert "step 2 of 6" in caplog.text
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "step-2",
        "step-4",
    ]  # torn step-5 cleared, step-4 redone
    assert max_diff(lora_tensors(tmp_path), lora_tensors(reference_run)) < 1e-6


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_target_follows_the_scheduler_config(sd_models, pairs, tmp_path, prediction_type):
    """Step 1 (LoRA B = 0, so the UNet is the base) recomputed by hand with the trainer's draw order."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    from ccsr.training_data import load_pixels

    model = sd_models[prediction_type]
    cfg = make_cfg(model, max_steps=1, batch_size=2)
    result = train_lora(cfg, pairs, tmp_path)
    logged = read_log(result.lora_dir)[0]["loss"]

    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    tokenizer = AutoTokenizer.from_pretrained(model, subfolder="tokenizer")
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    assert scheduler.config.prediction_type == prediction_type

    indices = torch.randperm(len(pairs), generator=seeded_generator(cfg.seed, 0, 0)).tolist()[:2]
    g = seeded_generator(cfg.seed, 1, 0, 0)
    flips = (torch.rand(2, generator=g) < 0.5).tolist()
    pixels = []
    for i, flip in zip(indices, flips, strict=True):
        x = load_pixels(pairs[i].image_path, RESOLUTION)
        pixels.append(torch.flip(x, dims=[2]) if flip else x)
    with torch.no_grad():
        dist = vae.encode(torch.stack(pixels)).latent_dist
        latents = (
            dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)
        ) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (2,), generator=g)
        ids = tokenizer(
            [pairs[i].prompt for i in indices],
            padding="max_length",
            truncation=True,
            max_length=tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids
        pred = unet(scheduler.add_noise(latents, noise, t), t, text_encoder(ids)[0]).sample
    eps_loss = torch.nn.functional.mse_loss(pred, noise).item()
    v_loss = torch.nn.functional.mse_loss(pred, scheduler.get_velocity(latents, noise, t)).item()
    expected, other = (eps_loss, v_loss) if prediction_type == "epsilon" else (v_loss, eps_loss)
    assert logged == pytest.approx(expected, rel=1e-5)
    assert logged != pytest.approx(other, rel=1e-3)


def test_lora_loads_in_plain_pipeline(sd_models, pairs, tmp_path):
    from diffusers import StableDiffusionPipeline

    result = train_lora(make_cfg(sd_models["epsilon"], max_steps=4, learning_rate=1e-2), pairs, tmp_path)
    pipe = StableDiffusionPipeline.from_pretrained(sd_models["epsilon"], safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    def draw():
        return pipe(
            pairs[0].prompt,
            num_inference_steps=2,
            height=64,
            width=64,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        ).images

    base = draw()
    pipe.load_lora_weights(result.lora_dir, adapter_name="ccsr")
    pipe.set_adapters(["ccsr"], adapter_weights=[0.0])
    assert np.array_equal(draw(), base)
    pipe.set_adapters(["ccsr"], adapter_weights=[1.0])
    assert np.abs(draw() - base).max() > 1e-4


def test_init_lora_is_loaded_and_continued(sd_models, pairs, reference_run, tmp_path):
    from diffusers import UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    from ccsr import lora

    # Loading into a fresh adapter reproduces the file exactly.
    unet = UNet2DConditionModel.from_pretrained(sd_models["epsilon"], subfolder="unet")
    unet.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=4,
            init_lora_weights="gaussian",
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        )
    )
    lora.load_into(unet, reference_run, rank=4)
    loaded = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    original = {k.removeprefix("unet."): v for k, v in lora_tensors(reference_run).items()}
    assert max_diff(loaded, original) == 0.0

    # Continuing: a small step away from the init LoRA, far from a fresh one.
    cfg = make_cfg(sd_models["epsilon"], max_steps=1, learning_rate=1e-5)
    train_lora(cfg, pairs, tmp_path / "continued", init_lora=reference_run)
    assert 0 < max_diff(lora_tensors(tmp_path / "continued"), lora_tensors(reference_run)) < 1e-4
    with pytest.raises(ValueError, match="rank"):
        train_lora(make_cfg(sd_models["epsilon"], rank=8), pairs, tmp_path / "bad", init_lora=reference_run)


def test_init_lora_is_loaded_in_float32_under_mixed_precision(sd_models, pairs, reference_run, tmp_path):
    """Under fp16 the UNet is half precision and the adapter float32: an init LoRA's values reach the adapter
    exactly, not rounded to half and promoted back. (fp16 training needs a GPU and accelerate keeps one mixed
    precision per process, so the trainer's adapter step runs here on an fp16 UNet without an Accelerator.)"""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from ccsr.compat import diffusers_dtype
    from ccsr.train import make_job
    from ccsr.trainer import LoRATrainer

    fine = 1 + 2**-12
    assert torch.tensor(fine).half().item() == 1.0
    init = tmp_path / "init"
    init.mkdir()
    tensors = {k: torch.full_like(v, fine) for k, v in lora_tensors(reference_run).items()}
    save_file(tensors, init / LORA_WEIGHTS_NAME)
    cfg = make_cfg(sd_models["epsilon"], mixed_precision="fp16")
    trainer = LoRATrainer.__new__(LoRATrainer)
    trainer.cfg, trainer.seed = cfg.trainer, cfg.seed
    trainer.job = make_job(cfg, pairs, tmp_path / "out", init_lora=init)
    trainer.unet = UNet2DConditionModel.from_pretrained(
        sd_models["epsilon"], subfolder="unet", **diffusers_dtype(torch.float16)
    )
    trainer._add_adapter()
    assert len(trainer.params) == len(tensors)
    assert all(p.dtype == torch.float32 and bool((p == fine).all()) for p in trainer.params)
    assert next(p for n, p in trainer.unet.named_parameters() if "lora" not in n).dtype == torch.float16


def test_options_and_result_reuse(sd_models, pairs, tmp_path):
    """Min-SNR, noise offset, accumulation, checkpointing and reward weights run; a finished run is reused."""
    cfg = make_cfg(
        sd_models["v_prediction"],
        max_steps=2,
        batch_size=3,
        snr_gamma=5.0,
        noise_offset=0.05,
        gradient_accumulation_steps=2,
        gradient_checkpointing=True,
        reward_weighted=True,
        lr_scheduler="cosine",
        lr_warmup_steps=1,
    )
    first = train_lora(cfg, pairs, tmp_path)
    assert first.steps == 2 and np.isfinite(first.final_loss)
    log = read_log(tmp_path)
    assert [r["step"] for r in log] == [1, 2] and log[0]["lr"] == 0.0 < log[1]["lr"]
    again = train_lora(cfg, pairs, tmp_path)
    assert (again.steps, again.final_loss, again.seconds) == (first.steps, first.final_loss, first.seconds)

    epochs = make_cfg(sd_models["epsilon"], max_steps=None, epochs=2, batch_size=3)
    assert train_lora(epochs, pairs, tmp_path / "epochs").steps == 2 * 3  # ceil(8 / 3) = 3 batches an epoch

    with pytest.raises(ValueError, match="class_name"):
        train_lora(make_cfg(sd_models["epsilon"], prior_weight=0.5), pairs, tmp_path / "prior")
    with pytest.raises(ValueError, match="'trainer.prior_weight' must be >= 0"):
        train_lora(make_cfg(sd_models["epsilon"], prior_weight=-1.0), pairs, tmp_path / "prior")
    with pytest.raises(ValueError, match="not found"):
        train_lora(make_cfg(sd_models["epsilon"]), [TrainPair("x", tmp_path / "missing.png")], tmp_path / "m")


# -------------------------------------------------------------------------------------------------------------
# prior preservation (Lee et al. 2023, eq. 2: fidelity loss + beta * loss on base-model data)

PRIOR_WEIGHT = 0.5


def make_prior_cfg(model: Path, **trainer) -> Config:
    cfg = make_cfg(model, prior_weight=PRIOR_WEIGHT, prior_images=4, **trainer)
    cfg.class_name = "cat"
    cfg.generator.steps = 2
    cfg.generator.batch_size = 4
    return cfg


@pytest.fixture(scope="session")
def prior_reference(sd_models, pairs, tmp_path_factory) -> Path:
    """An uninterrupted 4-step run with the prior term and checkpoints every 2 steps."""
    out = tmp_path_factory.mktemp("prior-reference")
    train_lora(make_prior_cfg(sd_models["epsilon"], max_steps=4, checkpoint_every=2), pairs, out)
    return out


def test_prior_images_are_drawn_once_and_cached(prior_reference):
    meta = json.loads((prior_reference / "prior" / "metadata.json").read_text())
    assert [e["prompt"] for e in meta["images"]] == [
        "a photo of a cat",
        "a photo of the cat",
        "a close-up photo of a cat",
        "a picture of a cat",
    ]
    for entry in meta["images"]:
        with Image.open(prior_reference / "prior" / entry["file"]) as img:
            assert img.size == (RESOLUTION, RESOLUTION)
    assert not list((prior_reference / "prior").glob(".*tmp*"))
    log = read_log(prior_reference)
    for record in log:
        assert record["loss"] == pytest.approx(
            record["fidelity_loss"] + PRIOR_WEIGHT * record["prior_loss"], rel=1e-6
        )
        assert np.isfinite(record["prior_loss"]) and record["prior_loss"] > 0


def test_prior_term_step_one_by_hand(sd_models, pairs, prior_reference, tmp_path):
    """Step 1 (LoRA B = 0: the UNet is the base): the fidelity term is the prior_weight = 0 run's loss and
    the prior term is recomputed from the cached prior images with the trainer's draw order."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    from ccsr.training_data import load_pixels

    model = sd_models["epsilon"]
    plain = train_lora(make_cfg(model, max_steps=1), pairs, tmp_path / "plain")
    first = read_log(prior_reference)[0]
    assert first["fidelity_loss"] == pytest.approx(read_log(plain.lora_dir)[0]["loss"], rel=1e-6)
    assert first["loss"] != pytest.approx(first["fidelity_loss"], rel=1e-3)

    meta = json.loads((prior_reference / "prior" / "metadata.json").read_text())
    images = [prior_reference / "prior" / e["file"] for e in meta["images"]]
    prompts = [e["prompt"] for e in meta["images"]]
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    tokenizer = AutoTokenizer.from_pretrained(model, subfolder="tokenizer")
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    size = 4  # min(batch_size 4, 4 prior images)
    indices = torch.randperm(len(images), generator=seeded_generator(0, 3, 0)).tolist()[:size]
    g = seeded_generator(0, 4, 0, 0)
    flips = (torch.rand(size, generator=g) < 0.5).tolist()
    pixels = []
    for i, flip in zip(indices, flips, strict=True):
        x = load_pixels(images[i], RESOLUTION)
        pixels.append(torch.flip(x, dims=[2]) if flip else x)
    with torch.no_grad():
        dist = vae.encode(torch.stack(pixels)).latent_dist
        latents = (
            dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)
        ) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (size,), generator=g)
        ids = tokenizer(
            [prompts[i] for i in indices],
            padding="max_length",
            truncation=True,
            max_length=tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids
        pred = unet(scheduler.add_noise(latents, noise, t), t, text_encoder(ids)[0]).sample
    prior = torch.nn.functional.mse_loss(pred, noise).item()
    assert first["prior_loss"] == pytest.approx(prior, rel=1e-5)
    assert first["loss"] == pytest.approx(first["fidelity_loss"] + PRIOR_WEIGHT * prior, rel=1e-5)


def test_prior_resume_equals_uninterrupted_and_reuses_images(
    sd_models, pairs, prior_reference, tmp_path, caplog
):
    cfg = make_prior_cfg(sd_models["epsilon"], max_steps=4, checkpoint_every=2)

    def stop_at_3(step: int, loss: float) -> None:
        if step == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_lora(cfg, pairs, tmp_path, on_step=stop_at_3)
    prior_files = sorted((tmp_path / "prior").iterdir())
    stamps = {p.name: p.stat().st_mtime_ns for p in prior_files}
    caplog.clear()  # only the resumed run's log counts (an earlier test may have left the root at INFO)
    with caplog.at_level(logging.INFO, logger="ccsr"):
        train_lora(cfg, pairs, tmp_path)
    assert "reusing 4 cached prior images" in caplog.text and "drawing" not in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "prior").iterdir()} == stamps
    # Drawn from cfg.seed alone: the same bytes as the reference run's.
    assert (tmp_path / "prior" / "metadata.json").read_text() == (
        prior_reference / "prior" / "metadata.json"
    ).read_text()
    assert max_diff(lora_tensors(tmp_path), lora_tensors(prior_reference)) < 1e-6
    np.testing.assert_allclose(
        [r["loss"] for r in read_log(tmp_path)], [r["loss"] for r in read_log(prior_reference)], rtol=1e-6
    )
    # A changed prior image is not trusted: it is drawn again, to the same bytes.
    victim = tmp_path / "prior" / "0001.png"
    original = victim.read_bytes()
    victim.write_bytes(original[:-8] + b"\0" * 8)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ccsr"):
        train_lora(
            make_prior_cfg(sd_models["epsilon"], max_steps=1),
            pairs,
            tmp_path / "again",
            prior_dir=tmp_path / "prior",
        )
    assert "missing or changed" in caplog.text
    assert victim.read_bytes() == original


def test_min_snr_weight_is_finite_at_zero_terminal_snr():
    import torch

    from ccsr.trainer import min_snr_weight

    snr = torch.tensor([0.0, 1.0, 5.0, 20.0])
    eps = min_snr_weight(snr, 5.0, "epsilon")
    assert torch.allclose(eps, torch.tensor([1.0, 1.0, 1.0, 0.25]))
    v = min_snr_weight(snr, 5.0, "v_prediction")
    assert torch.allclose(v, torch.tensor([0.0, 0.5, 5 / 6, 5 / 21]))


# -------------------------------------------------------------------------------------------------------------
# damaged inputs end in one error naming the file, before a model is loaded


@pytest.mark.parametrize("damage", ["truncated", "bit flip", "not an image", "empty"])
def test_a_damaged_training_image_is_named_before_any_model_is_loaded(tmp_path, damage):
    import re

    from ccsr.inputs import UserError

    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(good)
    data = good.read_bytes()
    bad = tmp_path / "bad.png"
    bad.write_bytes(
        {
            "truncated": data[:-20],
            "bit flip": data[:60] + bytes([data[60] ^ 0xFF]) + data[61:],
            "not an image": b"a text file named .png\n",
            "empty": b"",
        }[damage]
    )
    cfg = make_cfg(tmp_path / "no-such-model")  # never loaded: the images are checked first
    with pytest.raises(UserError, match=f"^{re.escape(str(bad))}: not a readable image"):
        train_lora(cfg, [TrainPair("a red object", good), TrainPair("a red object", bad)], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_non_image_is_named_also_once_ultralytics_has_wrapped_pil(tmp_path):
    """Importing ultralytics (the detector does, in the loop's process) wraps PIL's Image.open so that a file
    PIL cannot identify first makes it install and import a HEIF plugin; the check uses PIL's own open."""
    import ultralytics.utils.patches  # noqa: F401 - the import the detector makes
    from PIL import Image

    from ccsr.inputs import UserError, check_image

    assert Image.open.__module__ == "ultralytics.utils.patches"
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"a text file named .png\n")
    with pytest.raises(UserError, match="bad.png: not a readable image \\(cannot identify image file"):
        check_image(bad)


def test_a_damaged_init_lora_is_named_before_any_model_is_loaded(tmp_path):
    from ccsr.inputs import UserError

    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(good)
    init = tmp_path / "init"
    init.mkdir()
    (init / LORA_WEIGHTS_NAME).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    cfg = make_cfg(tmp_path / "no-such-model")
    with pytest.raises(UserError, match="init/pytorch_lora_weights.safetensors: not a readable safetensors"):
        train_lora(cfg, [TrainPair("a red object", good)], tmp_path / "out", init_lora=init)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty: no pytorch_lora_weights.safetensors in this folder"):
        train_lora(cfg, [TrainPair("a red object", good)], tmp_path / "out", init_lora=tmp_path / "empty")
    assert not (tmp_path / "out").exists()
