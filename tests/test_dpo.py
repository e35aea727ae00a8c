"""Diffusion-DPO in the LoRA trainer, on the real tiny SD: the loss by hand, shared draws, the frozen reference,
exact resume, cached == uncached, the fingerprint, the config checks and the loop's wiring."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ccsr.config import Config, ConfigError, TrainerConfig
from ccsr.rundir import LORA_WEIGHTS_NAME
from ccsr.seeds import seeded_generator
from ccsr.train import train_lora
from ccsr.training_data import PreferencePair, TrainPair
from tests import helpers
from tests.helpers import Interrupt, free_port, lora_tensors, max_diff, read_log

RESOLUTION = 32  # 4x4 latents
N_PREFERENCES = 3


@pytest.fixture(scope="session")
def model() -> str:
    from ccsr.models import resolve_model

    return resolve_model("ccsr-tiny/stable-diffusion")


@pytest.fixture(scope="session")
def preferences(tmp_path_factory) -> list[PreferencePair]:
    """Three prompts, each a noise winner and a loser of another size (the resize + crop runs on both)."""
    root = tmp_path_factory.mktemp("preference-images")
    rng = np.random.default_rng(1)
    out = []
    for i in range(N_PREFERENCES):
        paths = []
        for side, (w, h) in (("w", (48, 32)), ("l", (32, 40))):
            path = root / f"{i}-{side}.png"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
            paths.append(path)
        out.append(PreferencePair(f"a photo of a blue object number {i}", *paths))
    return out


def make_cfg(model: str, **trainer) -> Config:
    defaults = {
        "objective": "dpo",
        "resolution": RESOLUTION,
        "batch_size": 2,
        "max_steps": 3,
        "learning_rate": 1e-3,
        "dpo_beta": 50.0,
    }
    return helpers.make_cfg(model, **{**defaults, **trainer})


@pytest.fixture(scope="session")
def sft_lora(model, preferences, tmp_path_factory) -> Path:
    """An sft LoRA on the winners, trained hard enough to differ from the base: the reference LoRA."""
    out = tmp_path_factory.mktemp("sft-lora")
    winners = [TrainPair(p.prompt, p.winner_path) for p in preferences]
    train_lora(make_cfg(model, objective="sft", max_steps=2, learning_rate=3e-2), winners, out)
    return out


@pytest.fixture(scope="session")
def dpo_reference(model, preferences, tmp_path_factory) -> Path:
    """An uninterrupted 3-step DPO run against the base model, checkpoints every 2 steps, encodings cached."""
    out = tmp_path_factory.mktemp("dpo-reference")
    cfg = make_cfg(model, checkpoint_every=2)
    train_lora(cfg, [], out, encode_cache_dir=out / "encodings", preferences=preferences)
    return out


# -------------------------------------------------------------------------------------------------------------
# the preference stream (no model: an encoder that records what it is asked)


class RecordingEncoder:
    def __init__(self):
        self.calls: list[tuple[list[str], list[bool]]] = []

    def latent_distribution(self, paths, flips):
        self.calls.append(([Path(p).name for p in paths], list(flips)))
        n = len(paths)
        return torch.zeros(n, 4, 4, 4), torch.ones(n, 4, 4, 4)

    def text_embeddings(self, prompts):
        return torch.zeros(len(prompts), 77, 32)


def make_stream(preferences, num_processes=1, process_index=0, encoder=None):
    from ccsr.batches import PreferenceStream

    return PreferenceStream(
        "preference pairs",
        preferences,
        caches=(None, None),
        seed=7,
        order_key=5,
        draw_key=6,
        batch_size=3,
        accumulation=1,
        trainer_cfg=TrainerConfig(objective="dpo", noise_offset=0.1),
        num_train_timesteps=1000,
        latent_shape=(4, 4, 4),
        encoder=encoder or RecordingEncoder(),
        num_processes=num_processes,
        process_index=process_index,
    )


def test_winner_and_loser_share_flip_noise_and_timestep(preferences):
    encoder = RecordingEncoder()
    batch = make_stream(preferences, encoder=encoder).batch(step=0, micro=0)
    w, lo = batch.winner, batch.loser
    assert w.indices == lo.indices and sorted(w.indices) == list(range(N_PREFERENCES))
    assert torch.equal(w.noise, lo.noise) and torch.equal(w.timesteps, lo.timesteps)
    assert not torch.equal(w.latent_draw, lo.latent_draw)  # each image its own latent sample
    (winner_files, winner_flips), (loser_files, loser_flips) = encoder.calls
    assert winner_flips == loser_flips
    assert [f[0] for f in winner_files] == [f[0] for f in loser_files]  # image i of both is pair i's
    assert all(f.endswith("-w.png") for f in winner_files) and all(f.endswith("-l.png") for f in loser_files)
    # The numbers are a function of (seed, step, micro) alone: a fresh stream (a resumed run) draws them again.
    again = make_stream(preferences).batch(step=0, micro=0)
    assert torch.equal(again.loser.noise, lo.noise) and torch.equal(again.loser.latent_draw, lo.latent_draw)
    assert not torch.equal(make_stream(preferences).batch(step=1, micro=0).winner.noise, w.noise)


def test_two_process_slices_make_the_one_process_batch(preferences):
    whole = make_stream(preferences).batch(0, 0)
    parts = [make_stream(preferences, 2, rank).batch(0, 0) for rank in (0, 1)]
    assert [i for part in parts for i in part.winner.indices] == whole.winner.indices
    for field in ("latent_draw", "noise", "timesteps"):
        for side in ("winner", "loser"):
            joined = torch.cat([getattr(getattr(part, side), field) for part in parts])
            assert torch.equal(joined, getattr(getattr(whole, side), field))
    assert {part.winner.global_size for part in parts} == {N_PREFERENCES}


# -------------------------------------------------------------------------------------------------------------
# the loss


def test_model_equal_to_reference_gives_log_2(model, preferences, dpo_reference, tmp_path):
    """Step 1: LoRA B = 0, so the model is exactly the base reference: every logit is 0."""
    first = read_log(dpo_reference)[0]
    assert first["dpo_loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert first["loss"] == first["dpo_loss"]
    assert first["implicit_acc"] == 0.0  # a tie is not a win
    assert first["winner_vs_ref"] == 0.0
    assert first["winner_loss"] > 0 and "sft_loss" not in first
    assert read_log(dpo_reference)[-1]["dpo_loss"] != pytest.approx(math.log(2), rel=1e-4)

    weighted = train_lora(
        make_cfg(model, max_steps=1, dpo_sft_weight=0.5), [], tmp_path, preferences=preferences
    )
    log = read_log(weighted.lora_dir)[0]
    assert log["sft_loss"] == log["winner_loss"] == pytest.approx(first["winner_loss"], rel=1e-6)
    assert log["loss"] == pytest.approx(math.log(2) + 0.5 * first["winner_loss"], rel=1e-6)


def _hand_losses(model: str, preferences, lora: Path, scale: float, seed: int):
    """Step 1's per-sample losses recomputed with the trainer's draw order: (base, LoRA at ``scale``) for the
    winners and the losers; the LoRA applied as the generator applies it (diffusers' set_adapters)."""
    from diffusers import StableDiffusionPipeline

    from ccsr.training_data import load_pixels

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    size = 2
    order = torch.randperm(len(preferences), generator=seeded_generator(seed, 5, 0)).tolist()[:size]
    g = seeded_generator(seed, 6, 0, 0)
    flips = (torch.rand(size, generator=g) < 0.5).tolist()
    draws = {side: torch.randn((size, 4, 4, 4), generator=g) for side in ("winner", "loser")}
    noise = torch.randn((size, 4, 4, 4), generator=g)
    t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (size,), generator=g)
    ids = pipe.tokenizer(
        [preferences[i].prompt for i in order],
        padding="max_length",
        truncation=True,
        max_length=pipe.tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids
    losses = {}
    with torch.no_grad():
        text = pipe.text_encoder(ids)[0]
        noisy = {}
        for side in ("winner", "loser"):
            pixels = []
            for i, flip in zip(order, flips, strict=True):
                x = load_pixels(getattr(preferences[i], f"{side}_path"), RESOLUTION)
                pixels.append(torch.flip(x, dims=[2]) if flip else x)
            dist = pipe.vae.encode(torch.stack(pixels)).latent_dist
            latents = (dist.mean + dist.std * draws[side]) * pipe.vae.config.scaling_factor
            noisy[side] = pipe.scheduler.add_noise(latents, noise, t)

        def per_sample(side):
            pred = pipe.unet(noisy[side], t, text).sample
            return ((pred - noise) ** 2).mean(dim=(1, 2, 3))

        losses["base"] = {side: per_sample(side) for side in noisy}
        pipe.load_lora_weights(lora, adapter_name="ref")
        pipe.set_adapters(["ref"], adapter_weights=[scale])
        losses["ref"] = {side: per_sample(side) for side in noisy}
    return losses


def test_dpo_loss_by_hand_against_a_reference_lora(model, preferences, sft_lora, tmp_path):
    """The model is the base (step 1), the reference the sft LoRA at scale 0.7: logits are not 0, and every
    logged term matches the formula computed outside the trainer."""
    scale, beta = 0.7, 50.0
    cfg = make_cfg(model, max_steps=1, dpo_beta=beta)
    result = train_lora(
        cfg, [], tmp_path, preferences=preferences, reference_lora=sft_lora, reference_scale=scale
    )
    log = read_log(result.lora_dir)[0]
    losses = _hand_losses(model, preferences, sft_lora, scale, cfg.seed)
    model_w, model_l = losses["base"]["winner"], losses["base"]["loser"]
    ref_w, ref_l = losses["ref"]["winner"], losses["ref"]["loser"]
    logits = (ref_w - ref_l) - (model_w - model_l)
    assert logits.abs().min() > 1e-6  # a real test: the reference is not the model
    dpo = -torch.nn.functional.logsigmoid(beta * logits).mean().item()
    assert log["dpo_loss"] == pytest.approx(dpo, rel=1e-4)
    assert log["loss"] == pytest.approx(dpo, rel=1e-4)
    assert log["implicit_acc"] == pytest.approx((logits > 0).float().mean().item())
    assert log["winner_loss"] == pytest.approx(model_w.mean().item(), rel=1e-5)
    assert log["winner_vs_ref"] == pytest.approx((model_w - ref_w).mean().item(), rel=1e-4, abs=1e-7)


def test_only_the_trained_adapter_gets_gradients(model, preferences, sft_lora, tmp_path):
    from ccsr.lora import ADAPTER_NAME, REFERENCE_ADAPTER
    from ccsr.train import build_trainer, make_job

    cfg = make_cfg(model, max_steps=2)
    cfg.trainer.cache_latents = False
    job = make_job(cfg, [], tmp_path, preferences=preferences, reference_lora=sft_lora, reference_scale=0.5)
    trainer = build_trainer(cfg, job)
    trainer._build_streams(0)
    named = dict(trainer.unet.named_parameters())
    reference = {n: p.detach().clone() for n, p in named.items() if f".{REFERENCE_ADAPTER}." in n}
    assert reference and all(not named[n].requires_grad for n in reference)
    loss, _ = trainer.compute_loss(trainer.stream.batch(0, 0), None)
    loss.backward()
    with_grad = {n for n, p in named.items() if p.grad is not None}
    assert with_grad and with_grad == {n for n in named if f".{ADAPTER_NAME}." in n}
    assert all(named[n].grad.abs().sum() > 0 for n in with_grad if "lora_B" in n)
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.training_step(0)
    trainer.training_step(1)
    # Still frozen, unchanged; the trained adapter is the active one again.
    assert all(not named[n].requires_grad and torch.equal(named[n], v) for n, v in reference.items())
    assert {n for n, p in named.items() if p.requires_grad} == with_grad
    assert trainer.unet.active_adapters() == [ADAPTER_NAME]


# -------------------------------------------------------------------------------------------------------------
# resume, encodings, reuse


def test_dpo_resume_equals_uninterrupted(model, preferences, dpo_reference, tmp_path):
    cfg = make_cfg(model, checkpoint_every=2)

    def stop_at_3(step: int, loss: float) -> None:
        if step == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_lora(cfg, [], tmp_path, preferences=preferences, on_step=stop_at_3)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2"]
    train_lora(cfg, [], tmp_path, preferences=preferences)
    assert max_diff(lora_tensors(tmp_path), lora_tensors(dpo_reference)) == 0.0
    assert read_log(tmp_path) == read_log(dpo_reference)


def test_dpo_cached_and_uncached_agree(model, preferences, dpo_reference, tmp_path):
    uncached = train_lora(make_cfg(model, cache_latents=False), [], tmp_path, preferences=preferences)
    # The VAE sees other batch compositions on the two paths (float noise ~1e-7 in each per-sample loss).
    # DPO's logits are a difference of differences of losses ~1, times beta (50): measured 1e-5 apart in
    # dpo_loss and in the weights after 3 steps, while the losses themselves agree to 3e-7.
    for a, b in zip(read_log(uncached.lora_dir), read_log(dpo_reference), strict=True):
        assert a["winner_loss"] == pytest.approx(b["winner_loss"], rel=1e-5)
        assert a["dpo_loss"] == pytest.approx(b["dpo_loss"], abs=50 * 1e-6)
        assert a["implicit_acc"] == b["implicit_acc"]
    assert max_diff(lora_tensors(uncached.lora_dir), lora_tensors(dpo_reference)) < 5e-5
    cache = dpo_reference / "encodings"
    assert len(list(cache.glob("latent-*.safetensors"))) == 2 * N_PREFERENCES  # winners and losers
    assert len(list(cache.glob("text-*.safetensors"))) == N_PREFERENCES  # one caption per pair, shared


def test_finished_dpo_lora_is_reused_only_for_the_same_setup(model, preferences, dpo_reference):
    from dataclasses import replace

    from ccsr import train
    from ccsr.train import TRAINERS, make_job

    recorded = json.loads((dpo_reference / "train_result.json").read_text())
    cfg = make_cfg(model, checkpoint_every=2)
    again = train_lora(cfg, [], dpo_reference, encode_cache_dir=dpo_reference / "x", preferences=preferences)
    assert again.seconds == recorded["seconds"]

    hashes = [("w0", "l0"), ("w1", "l1")]
    job = make_job(cfg, [], dpo_reference, preferences=preferences[:2])

    def fp(cfg=cfg, hashes=hashes, reference=None, scale=1.0):
        setup = replace(job, preference_hashes=hashes, reference_lora=reference, reference_scale=scale)
        return train.fingerprint(cfg.trainer, cfg.seed, setup)

    base = fp()
    lora_file = dpo_reference / LORA_WEIGHTS_NAME
    different = [
        fp(make_cfg(model, checkpoint_every=2, dpo_beta=51.0)),
        fp(make_cfg(model, checkpoint_every=2, dpo_sft_weight=0.1)),
        fp(hashes=[("w0", "l0"), ("w1", "lX")]),
        fp(reference=lora_file),
        fp(reference=lora_file, scale=0.5),
    ]
    assert len({base, *different}) == 1 + len(different)
    assert fp(scale=0.5) == base  # the base model as reference has no scale
    # An sft setup's fingerprint ignores the DPO settings (so sft LoRAs from before them stay valid).
    sft = make_cfg(model, objective="sft")
    sft_beta = make_cfg(model, objective="sft", dpo_beta=1.0)
    pairs = [TrainPair("x", Path("x.png"))]
    sft_job = replace(
        job,
        trainer_class=TRAINERS["sft"],
        pairs=pairs,
        image_hashes=["h"],
        preferences=[],
        preference_hashes=[],
    )
    assert train.fingerprint(sft.trainer, sft.seed, sft_job) == train.fingerprint(
        sft_beta.trainer, sft_beta.seed, sft_job
    )


# -------------------------------------------------------------------------------------------------------------
# checks


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"objective": "ppo"}, "'trainer.objective' must be one of sft, dpo"),
        ({"objective": "dpo", "dpo_beta": 0.0}, "'trainer.dpo_beta' must be > 0"),
        ({"objective": "dpo", "dpo_sft_weight": -1.0}, "'trainer.dpo_sft_weight' must be >= 0"),
        ({"objective": "dpo", "reward_weighted": True}, "'trainer.reward_weighted' applies to objective sft"),
        ({"objective": "dpo", "snr_gamma": 5.0}, "'trainer.snr_gamma' applies to objective sft"),
    ],
)
def test_config_errors(fields, message):
    with pytest.raises(ConfigError) as info:
        TrainerConfig(**fields)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_train_lora_input_errors(model, preferences, tmp_path):
    with pytest.raises(ValueError, match="needs at least one preference pair"):
        train_lora(make_cfg(model), [], tmp_path, preferences=[])
    with pytest.raises(ValueError, match="pass pairs=\\[\\]"):
        train_lora(
            make_cfg(model), [TrainPair("x", preferences[0].winner_path)], tmp_path, preferences=preferences
        )
    with pytest.raises(ValueError, match="preference image not found"):
        missing = [PreferencePair("x", preferences[0].winner_path, tmp_path / "gone.png")]
        train_lora(make_cfg(model), [], tmp_path, preferences=missing)
    with pytest.raises(ValueError, match="reference LoRA"):
        train_lora(make_cfg(model), [], tmp_path, preferences=preferences, reference_lora=tmp_path / "none")
    with pytest.raises(ValueError, match="inputs of trainer.objective dpo"):
        sft = make_cfg(model, objective="sft")
        train_lora(sft, [TrainPair("x", preferences[0].winner_path)], tmp_path, preferences=preferences)
    with pytest.raises(ConfigError, match="dpo_beta"):
        train_lora(make_cfg(model, dpo_beta=-1.0), [], tmp_path, preferences=preferences)


# -------------------------------------------------------------------------------------------------------------
# the loop's train stage


def test_loop_trains_on_the_preferences_against_the_champion(tmp_path, monkeypatch):
    """objective dpo: the preferences (paths under the run), no plain pairs, the champion at the generation
    scale as reference (training_preferences is stubbed: the test builds the preferences itself)."""
    from ccsr import train
    from ccsr.records import Preference
    from ccsr.rundir import RunDir

    run = RunDir(tmp_path)
    cfg = make_cfg("ccsr-tiny/stable-diffusion")
    cfg.generator.generation_scale = 0.4
    records = [Preference("p0", "a cat", 1, 3, "iterations/002/candidates/p0-1.png", "c/p0-3.png", 9, 2)]
    monkeypatch.setattr(train, "training_preferences", lambda c, r, k: records, raising=False)
    champion = tmp_path / "iterations" / "001" / "lora"
    monkeypatch.setattr(train.gate, "champion_lora", lambda r, k: champion if k == 2 else None)
    calls = []
    monkeypatch.setattr(train, "make_job", lambda *args, **kwargs: calls.append((args, kwargs)))
    monkeypatch.setattr(train, "run_job", lambda *args, **kwargs: None)
    train.train_iteration_lora(cfg, run, 2)
    ((args, kwargs),) = calls
    assert args[1] == [] and args[2] == run.lora_dir(2)
    assert kwargs["preferences"] == [
        PreferencePair("a cat", tmp_path / "iterations/002/candidates/p0-1.png", tmp_path / "c/p0-3.png")
    ]
    assert (kwargs["reference_lora"], kwargs["reference_scale"]) == (champion, 0.4)


def test_stage_train_without_preferences_is_skipped_with_a_reason(tmp_path):
    from ccsr.loop import Loop
    from ccsr.rundir import RunDir, read_jsonl

    run = RunDir(tmp_path)
    run.files(1)["preferences"].parent.mkdir(parents=True)
    run.files(1)["preferences"].write_text("")
    cfg = make_cfg("ccsr-tiny/stable-diffusion")
    assert Loop(cfg, run).stage_train(1) == {"skipped": True, "reason": "no preference pairs"}
    assert read_jsonl(run.events_path)[-1]["reason"] == "no preference pairs"


# -------------------------------------------------------------------------------------------------------------
# two processes (the launch pattern of test_trainer_multiprocess.py)

LAUNCHED = """
import json, sys
from pathlib import Path
from ccsr.config_files import load_config
from ccsr.distributed import Ranks
from ccsr.train import train_lora
from ccsr.training_data import PreferencePair

spec = json.loads(Path(sys.argv[1]).read_text())
prefs = [PreferencePair(*p) for p in spec["preferences"]]
cfg = load_config(Path(spec["config"]))
train_lora(cfg, [], Path(spec["out"]), encode_cache_dir=Path(spec["cache"]), preferences=prefs,
           reference_lora=Path(spec["reference"]), reference_scale=0.5)
Ranks.close()
"""


def test_two_processes_train_the_one_process_lora(model, preferences, sft_lora, tmp_path):
    import os
    import subprocess
    import sys

    from ccsr.config_files import save_config

    # 3 pairs, global batch 2: step 1 splits 1 + 1, step 2 (the epoch's last pair) 0 + 1.
    cfg = make_cfg(model, max_steps=3, checkpoint_every=2)
    save_config(cfg, tmp_path / "config.yaml")
    spec = {
        "preferences": [[p.prompt, str(p.winner_path), str(p.loser_path)] for p in preferences],
        "config": str(tmp_path / "config.yaml"),
        "out": str(tmp_path / "two"),
        "cache": str(tmp_path / "cache"),
        "reference": str(sft_lora),
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "launched.py").write_text(LAUNCHED)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.accelerate_cli",
        "launch",
        "--multi_gpu",
        "--num_processes=2",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        f"--main_process_port={free_port()}",
        str(tmp_path / "launched.py"),
        str(tmp_path / "spec.json"),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one = train_lora(
        cfg, [], tmp_path / "one", preferences=preferences, reference_lora=sft_lora, reference_scale=0.5
    )
    result = json.loads((tmp_path / "two" / "train_result.json").read_text())
    assert result["num_processes"] == 2 and len(set(result["rank_adapter_sha256"])) == 1
    # Same pairs, draws and global-batch mean; only the float summation order differs (amplified by beta
    # through DPO's difference of differences, see the cached/uncached test).
    assert max_diff(lora_tensors(tmp_path / "two"), lora_tensors(one.lora_dir)) < 5e-5
    for a, b in zip(read_log(tmp_path / "two"), read_log(one.lora_dir), strict=True):
        assert a["winner_loss"] == pytest.approx(b["winner_loss"], rel=1e-5)
        assert a["dpo_loss"] == pytest.approx(b["dpo_loss"], abs=50 * 1e-6)
    assert len(list((tmp_path / "cache").glob("latent-*.safetensors"))) == 2 * N_PREFERENCES
