"""The train stage: iteration k of a run resolved into one :class:`TrainJob`, trained by its objective's
trainer.

``trainer.objective`` picks the trainer class, once, from :data:`TRAINERS`; a new objective is a trainer
subclass in a file of its own plus one entry there. Iteration k trains on the records of that objective's
kind (``pairs``, or ``preferences`` for Diffusion-DPO) of iterations 1..k (only k with ``trainer.train_on:
newest``), starts from the champion before k when ``trainer.init_from: previous``, and writes
``iterations/NNN/lora`` with the run's shared encoding cache and prior images. An objective on preference
pairs is measured against the model iteration k drew its candidates with: the champion before k at its
generation scale (``gate.generation_scale``), or the base model.

The job's fingerprint identifies the setup (``fingerprint``): a finished LoRA of the same
one is returned at once, so the loop's train stage, ``python -m ccsr.train_cli`` and a program calling
:func:`train_lora` find each other's work.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

from ccsr import gate, lora
from ccsr.config import Config, TrainerConfig
from ccsr.dpo_trainer import DPOTrainer
from ccsr.inputs import check_image
from ccsr.models import resolve_model
from ccsr.records import Pair, Preference, read_records
from ccsr.rundir import RunDir, sha256_file
from ccsr.trainer import RESULT_FILE, LoRATrainer, TrainResult
from ccsr.training_data import PIXEL_TRANSFORM, PRIOR_DIR, PreferencePair, PriorSettings, TrainJob, TrainPair

logger = logging.getLogger(__name__)

# ``trainer.objective`` -> its trainer; config validation accepts exactly these names.
TRAINERS: dict[str, type[LoRATrainer]] = {"sft": LoRATrainer, "dpo": DPOTrainer}

# The run directory's records an objective can train on (``LoRATrainer.trains_on``).
RECORDS = {"pairs": Pair, "preferences": Preference}


# Trainer fields that do not change the trained weights: a checkpoint written under other values of these is
# still a valid starting point. cache_latents only moves where the VAE runs (same math, see tests).
FINGERPRINT_EXCLUDED = ("checkpoint_every", "checkpoints_kept", "cache_latents", "init_from", "train_on")


def fingerprint(trainer: TrainerConfig, seed: int, job: TrainJob) -> str:
    """sha256 of everything the trained weights depend on: model, seed, trainer settings (less those the
    objective leaves out), data, init LoRA, the objective's own inputs (``fingerprint_inputs``, e.g. DPO's
    preference pairs and reference) and the prior images' settings. It decides whether a checkpoint or a
    finished LoRA is reused (see ``ccsr.train``)."""
    objective = job.trainer_class
    left_out = (*FINGERPRINT_EXCLUDED, *objective.fingerprint_left_out())
    payload = {
        "model": job.model_path,
        "seed": seed,
        "trainer": {k: v for k, v in asdict(trainer).items() if k not in left_out},
        "pairs": [[p.prompt, h, float(p.score)] for p, h in zip(job.pairs, job.image_hashes, strict=True)],
        "init_lora": lora.weights_hash(job.init_lora),
        "pixels": PIXEL_TRANSFORM,
    }
    objective_inputs = objective.fingerprint_inputs(job)
    if objective_inputs is not None:
        # Under "dpo", the key it had when Diffusion-DPO was the only objective with inputs of its own: the
        # fingerprints of LoRAs trained since stay the same.
        payload["dpo"] = objective_inputs
    if job.prior is not None:
        # The prior images are a function of these (and of model, seed, resolution, already above).
        payload["prior"] = {
            "prompts": job.prior.prompts,
            "steps": job.prior.steps,
            "guidance_scale": job.prior.guidance_scale,
        }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def trainer_class(cfg: Config) -> type[LoRATrainer]:
    return TRAINERS[cfg.trainer.objective]


# ---- iteration k of a run


def training_iterations(cfg: Config, k: int) -> list[int]:
    """The iterations whose records iteration k trains on: 1..k, or only k with ``trainer.train_on: newest``."""
    return [k] if cfg.trainer.train_on == "newest" else list(range(1, k + 1))


def training_pairs(cfg: Config, run: RunDir, k: int) -> list[Pair]:
    """The pairs of the iterations iteration k trains on (``training_iterations``)."""
    return [p for j in training_iterations(cfg, k) for p in read_records(run.files(j)["pairs"], Pair)]


def training_preferences(cfg: Config, run: RunDir, k: int) -> list[Preference]:
    """The preference pairs of the iterations iteration k trains on."""
    return [
        p for j in training_iterations(cfg, k) for p in read_records(run.files(j)["preferences"], Preference)
    ]


def training_records(cfg: Config, run: RunDir, k: int) -> list[Pair] | list[Preference]:
    """What iteration k trains on: the records of the objective's kind (``trains_on``)."""
    if trainer_class(cfg).trains_on == "preferences":
        return training_preferences(cfg, run, k)
    return training_pairs(cfg, run, k)


def nothing_to_train(cfg: Config, run: RunDir, k: int) -> str | None:
    """Why iteration k is not trained, or None: it brought no records of the objective's kind (retraining on
    earlier ones alone would only repeat an iteration)."""
    objective = trainer_class(cfg)
    kind = objective.trains_on
    return None if read_records(run.files(k)[kind], RECORDS[kind]) else objective.nothing_to_train


def init_lora(cfg: Config, run: RunDir, k: int) -> Path | None:
    """Iteration k's training start: the champion before k (``init_from: previous``), else a fresh LoRA."""
    return gate.champion_lora(run, k) if cfg.trainer.init_from == "previous" else None


def iteration_job(cfg: Config, run: RunDir, k: int) -> TrainJob:
    """Iteration k's training job, into ``run.lora_dir(k)`` with the run's encoding cache and prior images."""
    records = training_records(cfg, run, k)
    inputs = dict(
        init_lora=init_lora(cfg, run, k), encode_cache_dir=run.encode_cache, prior_dir=run.prior_cache
    )
    if trainer_class(cfg).trains_on == "preferences":
        preferences = [
            PreferencePair(p.prompt, run.root / p.winner_path, run.root / p.loser_path) for p in records
        ]
        return make_job(
            cfg,
            [],
            run.lora_dir(k),
            preferences=preferences,
            reference_lora=gate.champion_lora(run, k),
            reference_scale=gate.generation_scale(run, k, cfg.generator.generation_scale),
            **inputs,
        )
    pairs = [TrainPair(p.prompt, run.root / p.path, float(p.score)) for p in records]
    return make_job(cfg, pairs, run.lora_dir(k), **inputs)


def train_iteration_lora(cfg: Config, run: RunDir, k: int, on_step=None) -> TrainResult:
    """Train iteration k's LoRA (at once when the finished LoRA of the same setup is there)."""
    return run_job(cfg, iteration_job(cfg, run, k), on_step)


def stage_info(cfg: Config, run: RunDir, k: int, job: TrainJob, result: TrainResult) -> dict:
    """The train stage's record of iteration k."""
    info = {
        "pairs": len(training_pairs(cfg, run, k)),
        "lora_sha256": sha256_file(run.lora_file(k)),
        "steps": result.steps,
        "final_loss": result.final_loss,
        "init_lora": str(job.init_lora) if job.init_lora else None,
    }
    return {**info, **job.trainer_class.stage_info(job)}


# ---- any job


def make_job(
    cfg: Config,
    pairs: list[TrainPair],
    out_dir: Path,
    *,
    preferences: list[PreferencePair] | None = None,
    init_lora: Path | None = None,
    reference_lora: Path | None = None,
    reference_scale: float = 1.0,
    encode_cache_dir: Path | None = None,
    prior_dir: Path | None = None,
) -> TrainJob:
    """Check the inputs (before any model is loaded: a bad file ends here in one line naming it), hash the
    images and resolve the setup's fingerprint. ``prior_dir`` defaults to ``out_dir/prior``."""
    # A config changed in place (as tests and notebooks do) is checked here; a loaded one already was.
    cfg.trainer.validate()
    if init_lora is not None:
        lora.check_rank(init_lora, cfg.trainer.rank)
    objective = trainer_class(cfg)
    preferences = preferences or []
    objective.check_examples(pairs, preferences, reference_lora)
    prior = PriorSettings.from_config(cfg)
    missing = [str(p.image_path) for p in pairs if not Path(p.image_path).is_file()]
    if missing:
        raise ValueError(f"training image not found: {missing[0]} ({len(missing)} missing in total)")
    for path in [p.image_path for p in pairs] + [
        path for p in preferences for path in (p.winner_path, p.loser_path)
    ]:
        check_image(path)
    for given in (init_lora, reference_lora):
        if given is not None:
            lora.check(given)
    out_dir = Path(out_dir)
    job = TrainJob(
        trainer_class=objective,
        model_path=resolve_model(cfg.generator.model, cfg.model_cache),
        out_dir=out_dir,
        pairs=pairs,
        image_hashes=[sha256_file(Path(p.image_path)) for p in pairs],
        preferences=preferences,
        preference_hashes=[
            (sha256_file(Path(p.winner_path)), sha256_file(Path(p.loser_path))) for p in preferences
        ],
        init_lora=init_lora,
        reference_lora=reference_lora,
        reference_scale=reference_scale,
        encode_cache_dir=Path(encode_cache_dir) if encode_cache_dir is not None else None,
        prior_dir=Path(prior_dir) if prior_dir is not None else out_dir / PRIOR_DIR,
        prior=prior,
    )
    return replace(job, fingerprint=fingerprint(cfg.trainer, cfg.seed, job))


def finished_result(job: TrainJob) -> TrainResult | None:
    """The result of the job's finished LoRA, if ``out_dir`` holds one written under the same fingerprint."""
    result_file = job.out_dir / RESULT_FILE
    if not (result_file.exists() and (job.out_dir / lora.LORA_WEIGHTS_NAME).exists()):
        return None
    done = json.loads(result_file.read_text(encoding="utf-8"))
    if done.get("fingerprint") != job.fingerprint:
        return None
    return TrainResult(job.out_dir, done["steps"], done["final_loss"], done["seconds"])


def build_trainer(cfg: Config, job: TrainJob) -> LoRATrainer:
    """The job's trainer, set up (models loaded, adapter made): it gets the trainer settings, the seed, the
    job, and of the rest of the config only the device and the model's configured name."""
    from ccsr.devices import torch_device

    return job.trainer_class(
        cfg.trainer, cfg.seed, job, device=torch_device(cfg), model_name=cfg.generator.model
    )


def run_job(
    cfg: Config,
    job: TrainJob,
    on_step: Callable[[int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train the job's LoRA, resuming from its newest intact checkpoint; at once if it is already trained.

    ``on_step(step, loss)`` is called after every optimizer step (and its checkpoint): the loop uses it for
    progress and stop requests (an exception raised there stops training, resumable); ``should_stop``
    (asked after every step) stops it at that step, checkpointed (``LoRATrainer.train``).
    """
    done = finished_result(job)
    if done is not None:
        logger.info("LoRA in %s is already trained for this setup; nothing to do", job.out_dir)
        return done
    return build_trainer(cfg, job).train(on_step, should_stop)


def train_lora(
    cfg: Config,
    pairs: list[TrainPair],
    out_dir: Path,
    init_lora: Path | None = None,
    encode_cache_dir: Path | None = None,
    on_step: Callable[[int, float], None] | None = None,
    prior_dir: Path | None = None,
    preferences: list[PreferencePair] | None = None,
    reference_lora: Path | None = None,
    reference_scale: float = 1.0,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Fine-tune a LoRA on the UNet of ``cfg.generator.model`` and write it to ``out_dir``.

    Resumes from the newest intact checkpoint in ``out_dir/checkpoints`` written for the same setup (model,
    seed, trainer settings, pairs, init LoRA); returns at once if ``out_dir`` already holds the finished
    result of that setup.

    With ``trainer.prior_weight`` (beta) > 0 each step also adds beta times the denoising loss on a batch of
    base-model images of ``cfg.class_name`` (prior preservation, see ``ccsr.training_data.draw_prior``), drawn
    once and cached in ``prior_dir`` (default ``out_dir/prior``); pass the same folder to several runs to share
    them.

    With ``trainer.objective: dpo`` it trains on ``preferences`` instead (Diffusion-DPO; ``pairs`` must be
    empty) against a frozen reference: the model the candidates were drawn with, i.e. the base model, or
    ``reference_lora`` at ``reference_scale``. The setup then also covers the preference images, the DPO
    settings and the reference LoRA's hash and scale.

    Under ``accelerate launch --multi_gpu --num_processes P`` (or torchrun) every process takes a contiguous
    share of each global batch of ``trainer.batch_size``, gradients are summed over processes before the
    optimizer step, and only the main process writes files (LoRA, checkpoints, logs, encoding cache); see
    docs/performance.md for what matches the single-process run exactly and what only to float rounding.
    """
    job = make_job(
        cfg,
        pairs,
        out_dir,
        preferences=preferences,
        init_lora=init_lora,
        reference_lora=reference_lora,
        reference_scale=reference_scale,
        encode_cache_dir=encode_cache_dir,
        prior_dir=prior_dir,
    )
    return run_job(cfg, job, on_step, should_stop)
