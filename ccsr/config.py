"""Typed configuration: dataclasses filled from YAML, overridden by ``--set key.path=value``.

Unknown keys and wrong types are rejected with a message naming the key and the file. The resolved
config is written to the run directory as ``config.yaml`` so that a run can be resumed or reproduced.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")

# Repository root (for the shipped prompts/ and configs/ folders).
PACKAGE_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_ROOT.parent


class ConfigError(ValueError):
    """A problem with a config file or an override; the message names the key and the source."""


@dataclass
class PrompterConfig:
    backend: str = field(default="transformers", metadata={"help": "transformers | vllm"})
    model: str = field(default="ccsr-tiny/mistral", metadata={"help": "hub id, local folder or ccsr-tiny/*"})
    n_prompts: int = field(default=100, metadata={"help": "new training prompts per iteration (paper: 100)"})
    n_validation: int = field(default=50, metadata={"help": "held-out validation prompts (paper: 50)"})
    validation_file: str | None = field(
        default=None, metadata={"help": "one prompt per line; else generated"}
    )
    temperature: float = 0.7  # paper section 3
    top_p: float = 0.95  # paper section 3
    max_new_tokens: int = 512
    prompts_per_call: int = 10
    max_attempts: int = 20
    similarity_threshold: float = field(
        default=0.8, metadata={"help": "drop a prompt whose word-trigram Jaccard similarity is above this"}
    )
    max_words: int = field(default=60, metadata={"help": "longer prompts are cut (CLIP reads 77 tokens)"})
    ensure_class: bool = field(
        default=True, metadata={"help": "prefix the class name when a prompt lacks it"}
    )
    system_prompt: str = "prompts/system_prompt.txt"
    examples: str = "prompts/examples.txt"
    trust_remote_code: bool = False
    quantization: str | None = field(default=None, metadata={"help": "vllm: None lets vLLM auto-detect"})
    gpu_memory_utilization: float = 0.85


@dataclass
class GeneratorConfig:
    backend: str = field(default="diffusers", metadata={"help": "diffusers"})
    model: str = "ccsr-tiny/stable-diffusion"
    num_candidates: int = field(default=10, metadata={"help": "N images per prompt (paper: 10)"})
    resolution: int = 512
    steps: int = 50
    guidance_scale: float = 7.5
    batch_size: int = 10
    generation_scale: float = field(default=1.0, metadata={"help": "LoRA scale for the next candidates"})


@dataclass
class JudgeConfig:
    backend: str = field(default="transformers", metadata={"help": "transformers | vllm"})
    model: str = "ccsr-tiny/llava-next"
    questions: str = "prompts/questions.yaml"
    mode: str = field(default="logits", metadata={"help": "logits (fast, one pass) | generate (free text)"})
    tie_break: str = field(default="none", metadata={"help": "none (paper) | p_yes"})
    min_score: int | None = field(
        default=None,
        metadata={
            "help": "a prompt yields a pair only if its best eq. 1 score reaches this (None: the paper)"
        },
    )
    batch_size: int = 4
    max_new_tokens: int = 16
    trust_remote_code: bool = False


@dataclass
class DetectorConfig:
    backend: str = field(default="yolo_world", metadata={"help": "yolo_world"})
    model: str = field(
        default="ccsr-tiny/yolo-world", metadata={"help": "folder or .pt of a YOLO-World model"}
    )
    text_model: str = field(
        default="ccsr-tiny/clip", metadata={"help": "CLIP model whose text tower embeds the class name"}
    )
    threshold: float = field(default=0.6, metadata={"help": "minimum detection confidence (paper: 0.6)"})
    image_size: int = 640


@dataclass
class TrainerConfig:
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
    mixed_precision: str = field(default="no", metadata={"help": "no | fp16 | bf16"})
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    max_grad_norm: float = 1.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    train_on: str = field(default="all", metadata={"help": "all (pairs of every iteration) | newest"})
    init_from: str = field(default="previous", metadata={"help": "previous (LoRA of k-1) | fresh"})
    checkpoint_every: int = 0
    checkpoints_kept: int = 2
    cache_latents: bool = True
    reward_weighted: bool = False
    prior_weight: float = field(
        default=0.0,
        metadata={"help": "beta of the prior-preservation term (Lee et al. 2023, eq. 2); 0 = off"},
    )
    prior_images: int = field(
        default=8, metadata={"help": "base-model images of class prompts for the prior"}
    )
    prior_prompts: list[str] = field(
        default_factory=lambda: [
            "a photo of a {class_name}",
            "a photo of the {class_name}",
            "a close-up photo of a {class_name}",
            "a picture of a {class_name}",
        ],
        metadata={"help": "class prompt templates of the prior images, cycled; {class_name} is filled in"},
    )


@dataclass
class EvaluatorConfig:
    model: str = field(default="ccsr-tiny/clip", metadata={"help": "CLIP model for the CLIP score"})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])  # paper: 50 prompts x 4 seeds
    scales: list[float] = field(default_factory=lambda: [0.0, 0.2, 0.4, 0.7, 1.0])  # paper fig. 9
    tie_band: float = 0.01  # paper: a difference under 0.01 is a tie
    judge_and_detect: bool = field(
        default=True, metadata={"help": "also score eval images with the judge and the detector"}
    )


@dataclass
class GateConfig:
    enabled: bool = field(default=True, metadata={"help": "accept a LoRA only if it beats the champion"})
    metric: str = field(
        default="win_rate", metadata={"help": "win_rate | clip_score | judge_score | detection_rate"}
    )
    margin: float = field(
        default=0.0, metadata={"help": "the new LoRA must beat the champion by more than this"}
    )


@dataclass
class Config:
    seed: int = 0
    class_name: str | None = None
    iterations: int = 1
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    dtype: str = field(default="float32", metadata={"help": "float32 | float16 | bfloat16 for inference"})
    offline: bool = field(default=False, metadata={"help": "set the hub/ultralytics offline switches"})
    model_cache: str | None = field(default=None, metadata={"help": "where ccsr-tiny/* models are built"})
    prompter: PrompterConfig = field(default_factory=PrompterConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    evaluator: EvaluatorConfig = field(default_factory=EvaluatorConfig)
    gate: GateConfig = field(default_factory=GateConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CHOICES = {
    "judge.mode": ("logits", "generate"),
    "judge.tie_break": ("none", "p_yes"),
    "trainer.mixed_precision": ("no", "fp16", "bf16"),
    "trainer.train_on": ("all", "newest"),
    "trainer.init_from": ("previous", "fresh"),
    "trainer.lr_scheduler": ("constant", "constant_with_warmup", "linear", "cosine"),
    "dtype": ("float32", "float16", "bfloat16"),
    "gate.metric": ("win_rate", "clip_score", "judge_score", "detection_rate"),
}
POSITIVE = (
    "iterations",
    "prompter.n_prompts",
    "prompter.n_validation",
    "prompter.max_new_tokens",
    "prompter.prompts_per_call",
    "prompter.max_attempts",
    "prompter.max_words",
    "generator.num_candidates",
    "generator.resolution",
    "generator.steps",
    "generator.batch_size",
    "judge.batch_size",
    "judge.max_new_tokens",
    "detector.image_size",
    "trainer.rank",
    "trainer.batch_size",
    "trainer.epochs",
    "trainer.resolution",
    "trainer.gradient_accumulation_steps",
    "trainer.checkpoints_kept",
    "trainer.learning_rate",
    "trainer.alpha",
)
UNIT_INTERVAL = (
    "detector.threshold",
    "prompter.similarity_threshold",
    "prompter.top_p",
    "generator.generation_scale",
)
NON_NEGATIVE = (
    "seed",
    "generator.guidance_scale",
    "trainer.lr_warmup_steps",
    "trainer.checkpoint_every",
    "trainer.noise_offset",
    "trainer.prior_weight",
    "trainer.max_grad_norm",
)
POSITIVE_OR_NONE = ("trainer.max_steps", "trainer.snr_gamma")
MODEL_KEYS = (
    "prompter.model",
    "generator.model",
    "judge.model",
    "detector.model",
    "detector.text_model",
    "evaluator.model",
)
DEVICES = ("auto", "cpu", "mps", "cuda")  # or cuda:N


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError:
                pass
        raise ConfigError(f"{source}: '{key}' must be {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 (PyYAML) reads 1e-4 as a string: it wants 1.0e-4. Accept the plain scientific form.
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{source}: '{key}' must be {_type_name(tp)}, got {value!r}")


def _fill(cls: type, data: dict[str, Any], source: str, prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or 'top level'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{source}: unknown key '{prefix}{unknown[0]}' (known keys here: {', '.join(sorted(names))})"
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _fill(tp, value, source, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, prefix + name, source)
    return cls(**kwargs)


def _get(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: Config, source: str) -> Config:
    """Range and choice checks that types alone can't express."""
    from ccsr.backends import BACKENDS, backend_target

    for role in BACKENDS:
        try:
            backend_target(role, getattr(cfg, role).backend)
        except ValueError as exc:
            raise ConfigError(f"{source}: '{role}.backend': {exc}") from None
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{source}: '{key}' must be one of {', '.join(allowed)}, got {value!r}")
    for key in POSITIVE:
        if _get(cfg, key) <= 0:
            raise ConfigError(f"{source}: '{key}' must be > 0, got {_get(cfg, key)!r}")
    for key in POSITIVE_OR_NONE:
        if _get(cfg, key) is not None and _get(cfg, key) <= 0:
            raise ConfigError(f"{source}: '{key}' must be > 0 (or null for none), got {_get(cfg, key)!r}")
    for key in NON_NEGATIVE:
        if _get(cfg, key) < 0:
            raise ConfigError(f"{source}: '{key}' must be >= 0, got {_get(cfg, key)!r}")
    for key in UNIT_INTERVAL:
        if not 0.0 <= _get(cfg, key) <= 1.0:
            raise ConfigError(f"{source}: '{key}' must be within [0, 1], got {_get(cfg, key)!r}")
    if not 0.0 < cfg.prompter.gpu_memory_utilization <= 1.0:
        raise ConfigError(
            f"{source}: 'prompter.gpu_memory_utilization' must be within (0, 1], "
            f"got {cfg.prompter.gpu_memory_utilization!r}"
        )
    for key in MODEL_KEYS:
        if not _get(cfg, key).strip():
            raise ConfigError(
                f"{source}: '{key}' is empty; give a hub id, a local folder or ccsr-tiny/<name>"
            )
    device, _, index = cfg.device.partition(":")
    if (
        device not in DEVICES
        or (index and not (device == "cuda" and index.isdigit()))
        or cfg.device.endswith(":")
    ):
        raise ConfigError(f"{source}: 'device' must be auto, cpu, mps, cuda or cuda:N, got {cfg.device!r}")
    if any(s < 0 for s in cfg.evaluator.seeds):
        raise ConfigError(f"{source}: 'evaluator.seeds' must be >= 0, got {cfg.evaluator.seeds!r}")
    if not 0.0 < cfg.prompter.temperature <= 5.0:
        raise ConfigError(
            f"{source}: 'prompter.temperature' must be within (0, 5], got {cfg.prompter.temperature}"
        )
    if not cfg.evaluator.scales:
        raise ConfigError(f"{source}: 'evaluator.scales' must list at least one LoRA scale")
    for s in cfg.evaluator.scales:
        if not 0.0 <= s <= 1.0:
            raise ConfigError(f"{source}: 'evaluator.scales' must be within [0, 1], got {s!r}")
    if not cfg.evaluator.seeds:
        raise ConfigError(f"{source}: 'evaluator.seeds' must list at least one seed")
    if cfg.evaluator.tie_band < 0:
        raise ConfigError(f"{source}: 'evaluator.tie_band' must be >= 0, got {cfg.evaluator.tie_band}")
    if cfg.generator.resolution % 8 or cfg.trainer.resolution % 8:
        raise ConfigError(f"{source}: 'generator.resolution' and 'trainer.resolution' must be multiples of 8")
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    """``key.path=value``; the value is read as YAML so ``3``, ``0.5``, ``true`` and ``[0, 1]`` work."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _apply_override(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] = (), class_name: str | None = None) -> Config:
    """Load ``path`` (YAML), apply ``--set`` overrides, validate. Raises ConfigError on any problem."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read config ({exc})") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}: not valid YAML{where}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
    for text in overrides:
        key, value = parse_override(text)
        _apply_override(data, key, value)
    if class_name is not None:
        data["class_name"] = class_name
    if overrides:
        source += " (with --set overrides)"
    return validate(_fill(Config, data, source), source)


def save_config(cfg: Config, path: Path) -> None:
    from ccsr.rundir import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True))


def resolve_data_path(path: str) -> Path:
    """Data files named relative to the repository (``prompts/questions.yaml``) or absolute."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p
