"""Typed configuration: one dataclass per stage or role, nested in ``Config``.

Each section checks its own ranges and choices when it is built (``__post_init__``) and again on
``validate()``; ``Config`` adds the checks that span sections. Reading a config from YAML and ``--set``
overrides, and writing it back to a run directory, is ``ccsr.config_files``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ccsr.roles import MODEL_KEYS, backend_target, is_import_path, section_model_keys

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A problem with a config file or an override; the message names the key and the source."""


class _Section:
    """What every section shares: its key in the config and the range checks its ``validate`` is made of.

    A failed check raises ConfigError naming the dotted key (``'generator.steps' must be > 0, got 0``);
    ``load_config`` puts the file in front.
    """

    section: ClassVar[str] = ""  # the section's key ("generator"); "" for the top level

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for key in section_model_keys(self.section):  # the fields naming a model (ccsr.roles.MODEL_KEYS)
            if not getattr(self, key.split(".")[1]).strip():
                raise ConfigError(f"'{key}' is empty; give a hub id, a local folder or ccsr-tiny/<name>")

    def _key(self, name: str) -> str:
        return f"{self.section}.{name}" if self.section else name

    def _require(self, ok: bool, name: str, requirement: str) -> None:
        if not ok:
            raise ConfigError(f"'{self._key(name)}' {requirement}, got {getattr(self, name)!r}")

    def _one_of(self, name: str, allowed: tuple[str, ...]) -> None:
        self._require(getattr(self, name) in allowed, name, f"must be one of {', '.join(allowed)}")

    def _positive(self, *names: str) -> None:
        for name in names:
            self._require(getattr(self, name) > 0, name, "must be > 0")

    def _positive_or_none(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            self._require(value is None or value > 0, name, "must be > 0 (or null for none)")

    def _non_negative(self, *names: str) -> None:
        for name in names:
            self._require(getattr(self, name) >= 0, name, "must be >= 0")

    def _unit_interval(self, *names: str) -> None:
        for name in names:
            self._require(0.0 <= getattr(self, name) <= 1.0, name, "must be within [0, 1]")

    def _backend(self) -> None:
        """A name of the backend table (``ccsr.roles.BACKENDS``) or an import path ``package.module:Class``."""
        try:
            backend_target(self.section, self.backend)
        except ValueError as exc:
            raise ConfigError(f"'{self.section}.backend': {exc}") from None


@dataclass
class PrompterConfig(_Section):
    section: ClassVar[str] = "prompter"

    backend: str = "transformers"
    model: str = "ccsr-tiny/mistral"
    n_prompts: int = 100  # new training prompts per iteration (paper: 100)
    n_validation: int = 50  # held-out validation prompts (paper: 50), unless validation_file lists them
    validation_file: str | None = None  # one prompt per line
    # At most this many validation prompts (a file or n_validation): every evaluation draws each of them at
    # every scale and seed, so a file of 100,000 lines would take days per iteration. Raise it on purpose.
    max_validation: int = 1000
    temperature: float = 0.7  # paper section 3
    top_p: float = 0.95  # paper section 3
    max_new_tokens: int = 512
    prompts_per_call: int = 10
    max_attempts: int = 20
    similarity_threshold: float = 0.8  # a prompt more similar than this to one already kept is dropped
    max_words: int = 60  # longer prompts are cut (CLIP reads 77 tokens)
    ensure_class: bool = True  # prefix the class name when a prompt lacks it
    system_prompt: str = "prompts/system_prompt.txt"
    examples: str = "prompts/examples.txt"
    trust_remote_code: bool = False
    quantization: str | None = None  # vllm: None lets vLLM detect it from the checkpoint
    gpu_memory_utilization: float = 0.85  # vllm: the share of the GPU's memory its engine takes, in (0, 1]

    def validate(self) -> None:
        super().validate()
        self._backend()
        self._positive("n_prompts", "n_validation", "max_new_tokens", "prompts_per_call", "max_attempts")
        self._positive("max_words", "max_validation")
        self._require(
            self.n_validation <= self.max_validation,
            "n_validation",
            f"must be at most prompter.max_validation ({self.max_validation}); raise that key on purpose",
        )
        self._unit_interval("similarity_threshold", "top_p")
        self._require(0.0 < self.temperature <= 5.0, "temperature", "must be within (0, 5]")
        self._require(
            0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization", "must be within (0, 1]"
        )


@dataclass
class GeneratorConfig(_Section):
    section: ClassVar[str] = "generator"

    backend: str = "diffusers"
    model: str = "ccsr-tiny/stable-diffusion"
    num_candidates: int = 10  # N images per prompt (paper: 10)
    resolution: int = 512
    steps: int = 50
    guidance_scale: float = 7.5
    batch_size: int = 10
    # LoRA scale of the champion (the newest accepted LoRA) when it draws the next candidates; null: the
    # scale the gate accepted it at.
    generation_scale: float | None = 1.0

    def validate(self) -> None:
        super().validate()
        self._backend()
        self._positive("num_candidates", "resolution", "steps", "batch_size")
        self._non_negative("guidance_scale")
        if self.generation_scale is not None:
            self._unit_interval("generation_scale")
        self._require(self.resolution % 8 == 0, "resolution", "must be a multiple of 8")


@dataclass
class JudgeConfig(_Section):
    section: ClassVar[str] = "judge"

    backend: str = "transformers"
    model: str = "ccsr-tiny/llava-next"
    questions: str = "prompts/questions.yaml"
    mode: str = "logits"  # logits: the answer token's probability, one pass; generate: free text, parsed
    # logits mode of the transformers judge: encode each image once and reuse its KV cache for all questions
    # (ccsr.judge_prefix, ~8x faster); false runs one plain forward over every full question, same answers.
    prefix_reuse: bool = True
    batch_size: int = 4
    max_new_tokens: int = 16
    trust_remote_code: bool = False
    gpu_memory_utilization: float = 0.85  # vllm: the share of the GPU's memory its engine takes, in (0, 1]

    def validate(self) -> None:
        super().validate()
        self._backend()
        self._one_of("mode", ("logits", "generate"))
        self._positive("batch_size", "max_new_tokens")
        self._require(
            0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization", "must be within (0, 1]"
        )


@dataclass
class DetectorConfig(_Section):
    section: ClassVar[str] = "detector"

    backend: str = "yolo_world"
    model: str = "ccsr-tiny/yolo-world"  # a YOLO-World .pt file or a folder holding one
    text_model: str = "ccsr-tiny/clip"  # CLIP model whose text tower embeds the class name
    image_size: int = 640
    batch_size: int = 32  # images per detector call (halved on a CUDA out-of-memory error)

    def validate(self) -> None:
        super().validate()
        self._backend()
        self._positive("image_size", "batch_size")


@dataclass
class FilterConfig(_Section):
    """Which judged and detected candidates become training examples (paper section 3; ``ccsr.selection``)."""

    section: ClassVar[str] = "filter"

    detection_threshold: float = field(
        default=0.6,
        metadata={"help": "the detector confidence an image must reach to be picked (paper: 0.6)"},
    )
    min_score: int | None = field(
        default=None,
        metadata={"help": "a prompt yields a pair only if its best eq. 1 score reaches this (paper: null)"},
    )
    top_k: int = field(
        default=1,
        metadata={
            "help": "images per prompt that become training examples: 1 is the paper's rule; k > 1 keeps up "
            "to the k best that pass the detector and min_score, the detector then seeing every candidate"
        },
    )
    tie_break: str = field(
        default="none",
        metadata={"help": "none (paper) | p_yes: images of the same eq. 1 score ranked by signed P(yes)"},
    )

    def validate(self) -> None:
        super().validate()
        self._unit_interval("detection_threshold")
        self._positive("top_k")
        self._one_of("tie_break", ("none", "p_yes"))


@dataclass
class TrainerConfig(_Section):
    section: ClassVar[str] = "trainer"

    rank: int = 4
    alpha: float = 4.0
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    batch_size: int = 18
    epochs: int = 100
    max_steps: int | None = None
    resolution: int = 512
    random_flip: bool = True
    mixed_precision: str = "no"
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    max_grad_norm: float = 1.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    train_on: str = "all"  # all: the pairs of every iteration so far; newest: this iteration's only
    init_from: str = "previous"  # previous: continue from the LoRA of iteration k-1; fresh: a new LoRA
    checkpoint_every: int = 0
    checkpoints_kept: int = 2
    cache_latents: bool = True
    reward_weighted: bool = False
    prior_weight: float = 0.0  # beta of the prior-preservation term (Lee et al. 2023, eq. 2); 0 = off
    prior_images: int = 8  # base-model images of class prompts for the prior term
    # Class prompt templates of the prior images, cycled; {class_name} is filled in.
    prior_prompts: list[str] = field(
        default_factory=lambda: [
            "a photo of a {class_name}",
            "a photo of the {class_name}",
            "a close-up photo of a {class_name}",
            "a picture of a {class_name}",
        ]
    )
    # sft: the denoising loss on the selected pairs (the paper). dpo: Diffusion-DPO (Wallace et al. 2023) on the
    # (winner, loser) preferences against the model the candidates were drawn with (see ccsr.dpo_trainer).
    objective: str = "sft"
    # DPO's beta in diffusers' convention, loss = -logsigmoid(dpo_beta * logits) without the paper's 1/2 factor:
    # 2500 here is the paper's beta = 5000.
    dpo_beta: float = 2500.0
    dpo_sft_weight: float = 0.0  # weight of the plain denoising loss on the winners, added to the DPO loss

    def validate(self) -> None:
        super().validate()
        from ccsr.train import (
            TRAINERS,
        )  # the objectives are the trainers' table (imported here: it imports them)

        self._one_of("objective", tuple(TRAINERS))
        self._positive("dpo_beta")
        self._non_negative("dpo_sft_weight")
        TRAINERS[self.objective].check_settings(self)
        self._one_of("lr_scheduler", ("constant", "constant_with_warmup", "linear", "cosine"))
        self._one_of("mixed_precision", ("no", "fp16", "bf16"))
        self._one_of("train_on", ("all", "newest"))
        self._one_of("init_from", ("previous", "fresh"))
        self._positive("rank", "batch_size", "epochs", "resolution", "gradient_accumulation_steps")
        self._positive("checkpoints_kept", "learning_rate", "alpha")
        self._require(
            bool(self.target_modules) and all(isinstance(m, str) and m for m in self.target_modules),
            "target_modules",
            "must list at least one module name, e.g. [to_q, to_k, to_v, to_out.0]",
        )
        self._positive_or_none("max_steps", "snr_gamma")
        self._non_negative(
            "lr_warmup_steps", "checkpoint_every", "noise_offset", "prior_weight", "max_grad_norm"
        )
        self._require(self.resolution % 8 == 0, "resolution", "must be a multiple of 8")
        if self.prior_weight > 0:
            if self.prior_images < 1 or not self.prior_prompts:
                raise ConfigError(
                    "'trainer.prior_weight' > 0 needs trainer.prior_images >= 1 and trainer.prior_prompts"
                )
            for template in self.prior_prompts:
                try:
                    template.format(class_name="x")
                except (KeyError, IndexError, ValueError, AttributeError) as exc:
                    raise ConfigError(
                        f"'trainer.prior_prompts': a template may only use the {{class_name}} placeholder, "
                        f"got {template!r} ({exc!r})"
                    ) from None


@dataclass
class EvaluatorConfig(_Section):
    section: ClassVar[str] = "evaluator"

    model: str = "ccsr-tiny/clip"  # CLIP model of the CLIP score
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])  # paper: 50 prompts x 4 seeds
    scales: list[float] = field(default_factory=lambda: [0.0, 0.2, 0.4, 0.7, 1.0])  # paper fig. 9
    tie_band: float = 0.01  # paper: a difference under 0.01 is a tie
    judge_and_detect: bool = True  # also score the evaluation images with the judge and the detector
    batch_size: int = 64  # images per CLIP call (halved on a CUDA out-of-memory error)
    unit_size: int | None = field(
        default=None,
        metadata={
            "help": "(held-out prompt, seed) jobs at one scale committed together, the unit a resumed "
            "evaluation redoes at most; null: generator.batch_size"
        },
    )

    def validate(self) -> None:
        super().validate()
        self._positive_or_none("unit_size")
        if not self.scales:
            raise ConfigError("'evaluator.scales' must list at least one LoRA scale")
        for s in self.scales:
            if not 0.0 <= s <= 1.0:
                raise ConfigError(f"'evaluator.scales' must be within [0, 1], got {s!r}")
        # Scale 0 is the base model, always evaluated; without a scale > 0 the LoRA never is, and the gate
        # would score it 0.0.
        self._require(any(s > 0 for s in self.scales), "scales", "must list at least one LoRA scale > 0")
        if not self.seeds:
            raise ConfigError("'evaluator.seeds' must list at least one seed")
        self._require(all(s >= 0 for s in self.seeds), "seeds", "must be >= 0")
        self._non_negative("tie_band")
        self._positive("batch_size")


# The evaluation's summary per scale: what each gate metric needs it to compute.
GATE_METRICS = ("win_rate", "clip_score", "judge_score", "detection_rate")
_NEEDS_JUDGE_AND_DETECT = ("judge_score", "detection_rate")
GATE_RULES = ("mean", "paired_bootstrap")
GATE_RESAMPLING = ("prompts", "prompts_and_seeds")
# The gate metrics an evaluation image has a value of (``ccsr.gate.per_image``; detection as 0/1).
PER_IMAGE_METRICS = ("clip_score", "judge_score", "detection_rate")


@dataclass
class GateConfig(_Section):
    section: ClassVar[str] = "gate"

    enabled: bool = True  # accept a LoRA only if it beats the champion
    metric: str = "win_rate"
    margin: float = 0.0  # the new LoRA must beat the champion by more than this
    # mean: the best scale's mean metric beats the champion's by more than margin. paired_bootstrap: that
    # scale's per-image metric, paired with the champion's by (prompt, seed), gains more than margin at the
    # lower end of a two-sided interval (ccsr.gate); needs a per-image metric, so not win_rate.
    rule: str = "mean"
    bootstrap_draws: int = 2000  # paired_bootstrap: resamples of the held-out prompts
    confidence: float = 0.95  # paired_bootstrap: the interval's two-sided level
    # paired_bootstrap: prompts (whole prompts, each with all its images) or prompts_and_seeds (the seeds within
    # each drawn prompt too: counts the seed noise twice, wider)
    resample: str = "prompts"

    def validate(self) -> None:
        super().validate()
        self._one_of("metric", GATE_METRICS)
        self._one_of("rule", GATE_RULES)
        self._one_of("resample", GATE_RESAMPLING)
        self._require(
            isinstance(self.bootstrap_draws, int) and not isinstance(self.bootstrap_draws, bool),
            "bootstrap_draws",
            "must be an integer",
        )
        self._require(self.bootstrap_draws >= 100, "bootstrap_draws", "must be >= 100")
        self._require(0.0 < self.confidence < 1.0, "confidence", "must be within (0, 1)")
        # win_rate counts wins against the base; an image has no win-rate of its own to pair with the champion's.
        if self.rule == "paired_bootstrap" and self.metric not in PER_IMAGE_METRICS:
            raise ConfigError(
                f"'gate.rule' paired_bootstrap pairs per-image values, and gate.metric {self.metric} has none; "
                f"use gate.metric {', '.join(PER_IMAGE_METRICS)} (or gate.rule mean)"
            )


DEVICES = ("auto", "cpu", "mps", "cuda")  # or cuda:N


@dataclass
class Config(_Section):
    seed: int = 0
    class_name: str | None = None
    iterations: int = 1
    # auto | cpu | mps | cuda | cuda:N. The vllm backends take no device index (vLLM uses the first visible GPU):
    # for them pick the GPU with CUDA_VISIBLE_DEVICES=N and device: cuda; cuda:N with N > 0 is refused.
    device: str = "auto"
    dtype: str = "float32"  # of inference
    offline: bool = False  # set the hub/ultralytics offline switches even for hub ids
    model_cache: str | None = None  # where ccsr-tiny/* models are built (default: $CCSR_CACHE)
    prompter: PrompterConfig = field(default_factory=PrompterConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    evaluator: EvaluatorConfig = field(default_factory=EvaluatorConfig)
    gate: GateConfig = field(default_factory=GateConfig)

    def sections(self) -> list[_Section]:
        return [value for value in vars(self).values() if isinstance(value, _Section)]

    def validate(self) -> None:
        """Every section's checks, the top level's and those across sections (for a config changed in place,
        as tests and notebooks do, call it again)."""
        for section in self.sections():
            section.validate()
        self._one_of("dtype", ("float32", "float16", "bfloat16"))
        self._positive("iterations")
        self._non_negative("seed")
        self._require(self.seed < 2**63, "seed", "must be below 2**63 (torch seeds are 64-bit)")
        device, _, index = self.device.partition(":")
        if (
            device not in DEVICES
            or (index and not (device == "cuda" and index.isdigit()))
            or self.device.endswith(":")
        ):
            raise ConfigError(f"'device' must be auto, cpu, mps, cuda or cuda:N, got {self.device!r}")
        for section in (self.prompter, self.judge):
            if section.backend == "vllm" and index and int(index) > 0:
                raise ConfigError(
                    f"'device' {self.device} cannot reach {section.section}.backend vllm, which takes no device "
                    f"index: set device: cuda and run with CUDA_VISIBLE_DEVICES={int(index)}"
                )
        # The table's judges read P(yes) in logits mode only (generate mode gives None); the tie-break would
        # silently rank every tied image equal.
        if (
            self.filter.tie_break == "p_yes"
            and self.judge.mode == "generate"
            and not is_import_path(self.judge.backend)
        ):
            raise ConfigError(
                "'filter.tie_break' p_yes needs judge.mode: logits (generate mode reads no P(yes))"
            )
        if self.gate.metric in _NEEDS_JUDGE_AND_DETECT and not self.evaluator.judge_and_detect:
            raise ConfigError(
                f"'gate.metric' {self.gate.metric} is computed only with evaluator.judge_and_detect: true; "
                "set it, or use gate.metric win_rate or clip_score"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def model_keys() -> tuple[str, ...]:
    """Every config key that names a model (``judge.model``, ``detector.text_model``, ...), in config order
    (the table is ``ccsr.roles.MODEL_KEYS``)."""
    return tuple(MODEL_KEYS)
