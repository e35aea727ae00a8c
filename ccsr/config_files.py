"""Config files: YAML filled into ``ccsr.config``'s dataclasses, overridden by ``--set key.path=value``,
written back to a run directory as ``config.yaml`` (so that a run can be resumed or reproduced); and the data
files a config names (a question set, a system prompt), found as given or among the copies shipped with ccsr.

Unknown keys and wrong types are rejected with a message naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import logging
import math
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from ccsr.config import Config, ConfigError

_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")

PACKAGE_ROOT = Path(__file__).resolve().parent
# The source tree: a checkout or an editable install, where prompts/ and configs/ sit beside the package.
REPO_ROOT = PACKAGE_ROOT.parent

logger = logging.getLogger(__name__)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if float in args and isinstance(value, float):
            return _coerce(value, float, key, source)  # a NaN is named as such, not as the wrong type
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
            number = float(value)
        # YAML 1.1 (PyYAML) reads 1e-4 as a string: it wants 1.0e-4. Accept the plain scientific form.
        elif isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            number = float(value)
        else:
            number = None
        if number is not None:
            # YAML's .nan and .inf are floats; no setting means anything with them (NaN passes no range check).
            if not math.isfinite(number):
                raise ConfigError(f"{source}: '{key}' must be a finite number, got {value!r}")
            return number
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
    try:
        return cls(**kwargs)  # the section validates itself
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


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


# Keys that moved, old -> new. The filter's rules lived in the judge and detector sections before the filter
# had a section of its own; a file or an override naming an old key still loads (with one warning), so the
# config.yaml of a run directory written before the move resumes as the same run.
MOVED_KEYS = {
    "judge.top_k": "filter.top_k",
    "judge.min_score": "filter.min_score",
    "judge.tie_break": "filter.tie_break",
    "detector.threshold": "filter.detection_threshold",
}


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    """Log ``message`` as a warning the first time only: a command reads a run's saved config.yaml several
    times (to resume, for the status it prints), and one line says it all."""
    if message not in _warned:
        _warned.add(message)
        logger.warning("%s", message)


def _move_old_keys(data: dict[str, Any], source: str) -> list[str]:
    """Rename the ``MOVED_KEYS`` found in ``data`` (a config's YAML) in place; returns the old keys found."""
    found = []
    for old, new in MOVED_KEYS.items():
        old_section, old_name = old.split(".")
        new_section, new_name = new.split(".")
        section = data.get(old_section)
        if not isinstance(section, dict) or old_name not in section:
            continue
        target = data.setdefault(new_section, {})
        if not isinstance(target, dict):
            continue  # a malformed section, which _fill names
        if new_name in target:
            raise ConfigError(f"{source}: '{old}' and '{new}' are one setting; keep '{new}' only")
        target[new_name] = section.pop(old_name)
        found.append(old)
    return found


def load_config(path: str | Path | None, overrides: list[str] = (), class_name: str | None = None) -> Config:
    """Load ``path`` (YAML), apply ``--set`` overrides, validate. Raises ConfigError on any problem.

    An old key of ``MOVED_KEYS``, in the file or an override, is read as its new key; one warning names them.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        # A name such as configs/tiny.yaml is the shipped config when the current folder holds no such file.
        file = resolve_data_path(path)
        source = str(path if file == Path(path).expanduser() else file)
        try:
            text = file.read_text(encoding="utf-8")
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
    moved = _move_old_keys(data, source)
    for text in overrides:
        key, value = parse_override(text)
        if key in MOVED_KEYS:
            moved.append(key)
            key = MOVED_KEYS[key]
        _apply_override(data, key, value)
    if class_name is not None:
        data["class_name"] = class_name
    if overrides:
        source += " (with --set overrides)"
    if moved:
        _warn_once(
            f"{source}: read the old keys "
            + ", ".join(f"{old} as {MOVED_KEYS[old]}" for old in dict.fromkeys(moved))
            + " (the filter's rules have a section of their own now)"
        )
    return _fill(Config, data, source)


def save_config(cfg: Config, path: Path) -> None:
    from ccsr.rundir import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True))


def _data_roots() -> list[Path]:
    """Where the default data that came with ccsr lies: inside an installed wheel (``ccsr/_data/``, see
    pyproject.toml), then in the source tree (a checkout or an editable install)."""
    packaged = importlib.resources.files("ccsr") / "_data"
    roots = [Path(str(packaged))] if packaged.is_dir() else []
    if (REPO_ROOT / "pyproject.toml").is_file():  # a source tree; not site-packages, where other folders sit
        roots.append(REPO_ROOT)
    return roots


def shipped_file(name: str | Path) -> Path:
    """The copy of a default data file (``prompts/questions.yaml``, ``configs/paper.yaml``) that came with ccsr,
    whatever the current folder; when there is none, where it belongs (so that reading it names that path)."""
    candidates = [root / name for root in _data_roots()] or [PACKAGE_ROOT / "_data" / name]
    return next((path for path in candidates if path.is_file()), candidates[0])


def resolve_data_path(path: str | Path) -> Path:
    """A data file or config named by the user or a config: ``path`` itself when it is absolute or exists
    relative to the current folder (so a config can name its own files), else the copy shipped with ccsr
    (``shipped_file``). A path found nowhere is returned as given, so that errors name it as the user did."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    shipped = shipped_file(p)
    return shipped if shipped.is_file() else p
