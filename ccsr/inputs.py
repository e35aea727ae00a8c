"""Checks of what is handed to ccsr from outside its own run bookkeeping: the models and data files a config
names, a training image (a LoRA's checks are in ``ccsr.lora``); and the offline switches, which depend on
where those models are.

Each check is cheap and runs before any model is loaded. A model key is judged by the files its folder
holds (``ccsr.roles.MODEL_KEYS`` says what kind of folder each key names); a hub id is not looked up. A
problem raises ``UserError`` whose message names the key or the file, says what is wrong and what to do; the
command line prints it as one line (exit code 2).

No hub library is imported at module level: the offline switches are read by those libraries at import
time, and ``set_offline`` must run before any of them is imported.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ccsr.backends import backend_class, loaded_model_keys
from ccsr.config import model_keys
from ccsr.config_files import resolve_data_path
from ccsr.detector import find_model_file
from ccsr.models import check_embedded, is_embedded
from ccsr.roles import BACKENDS, MODEL_KEYS

if TYPE_CHECKING:
    from ccsr.config import Config

logger = logging.getLogger(__name__)


class UserError(ValueError):
    """Anything the user can fix: a file given to ccsr that cannot be used, a model key naming the wrong kind
    of model, a bad command-line value. The message is one line, ``<path or key>: <what is wrong>; <what to
    do>``; the command line prints it as ``ccsr: error: <message>`` (exit code 2)."""


def _pil_open():
    """PIL's own ``Image.open``. Importing ultralytics (the detector) replaces it with a wrapper that, for a
    file PIL cannot identify, first installs (pip, when online) and imports a HEIF plugin; a file that is no
    image must simply fail."""
    from PIL import Image

    return getattr(sys.modules.get("ultralytics.utils.patches"), "_image_open", Image.open)


def check_image(path: str | Path) -> None:
    """An image file PIL can open whose data is complete (``verify`` reads it through without decoding)."""
    from PIL import Image

    try:
        with _pil_open()(path) as image:
            image.verify()
    except ImportError:  # the wrapper above, should its original not be found: it ends here for a non-image
        raise UserError(f"{path}: not a readable image (cannot identify it); restore or replace it") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        # PIL reports a broken PNG chunk as SyntaxError; a non-image is UnidentifiedImageError (an OSError).
        raise UserError(f"{path}: not a readable image ({exc}); restore or replace it") from None


# --- the models a config names (file names only: no weights are loaded) -----------------------------------

OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "YOLO_OFFLINE")

# The parts of a Stable Diffusion folder the pipeline loads, each with the config file it must hold (the
# tokenizer's files vary: it must just not be empty). unet, vae and text_encoder hold weights too.
SD_PARTS = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "scheduler": "scheduler_config.json",
    "tokenizer": None,
}
_SD_WEIGHTED = ("unet", "vae", "text_encoder")


def set_offline(cfg: Config) -> None:
    """Set the hub/ultralytics offline switches when the config asks for it or every model is on disk.

    The libraries read these variables when they are imported (ultralytics without YOLO_OFFLINE does DNS
    look-ups on import), so this runs before any of them is imported: deciding needs no hub library (see
    ``all_models_local``). For an in-process caller that imported huggingface_hub already, its module-level
    flag is switched too.
    """
    if cfg.offline or all_models_local(cfg):
        for var in OFFLINE_VARS:
            os.environ[var] = "1"
        hub_constants = sys.modules.get("huggingface_hub.constants")
        if hub_constants is not None:
            hub_constants.HF_HUB_OFFLINE = True
    os.environ.setdefault("YOLO_VERBOSE", "False")
    # Model-loading bars of the libraries drown ccsr's own per-stage bars.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def config_value(cfg: Config, key: str):
    """The value of a dotted config key (``detector.model``) or a top-level one (``seed``)."""
    section, _, name = key.rpartition(".")
    return getattr(getattr(cfg, section), name) if section else getattr(cfg, name)


def _on_disk(name: str) -> bool:
    return is_embedded(name) or Path(name).expanduser().exists()


def _is_hub_id(name: str) -> bool:
    """``name`` or ``org/name`` by the hub's own rules. Imports huggingface_hub: call after ``set_offline``."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _models_in_use(cfg: Config) -> list[str]:
    """The model keys this config's run loads, in config order: those every run loads, and each backend
    class's ``model_keys``."""
    in_use = {key for key, kind in MODEL_KEYS.items() if kind.always_loaded}
    for role in BACKENDS:
        try:
            in_use.update(loaded_model_keys(role, backend_class(role, getattr(cfg, role).backend)))
        except ValueError as exc:
            raise UserError(f"{role}.backend: {exc}") from None
    return [key for key in model_keys() if key in in_use]


def all_models_local(cfg: Config) -> bool:
    """True when every model the run loads is embedded or an existing file or folder.

    Any other name is a hub id or an ultralytics asset name, both downloads, or no model at all, which
    ``check_models`` refuses before anything runs: either way the run is not an offline one. So this needs
    no hub library, and can run before the offline switches are set.
    """
    return all(_on_disk(config_value(cfg, key)) for key in _models_in_use(cfg))


def _check_readable(key: str, path: Path) -> None:
    if not os.access(path, os.R_OK) or (path.is_dir() and not os.access(path, os.X_OK)):
        raise UserError(f"{key}: {path} cannot be read (permission denied); fix its permissions")


def _check_embedded(key: str, name: str) -> None:
    try:
        check_embedded(name)
    except ValueError as exc:  # it names the embedded models there are
        raise UserError(f"{key}: {exc}; use one of them, a local folder or a hub id") from None


def _check_folder(key: str, name: str) -> None:
    kind = MODEL_KEYS[key]
    what, required = kind.what, kind.required
    if is_embedded(name):
        return _check_embedded(key, name)
    path = Path(name).expanduser()
    if not path.exists():
        if not _is_hub_id(name):
            raise UserError(f"{key}: {name} does not exist; give {what} or a hub id")
        return  # a hub id: resolved (or refused, offline) by the library when the model is loaded
    if not path.is_dir():
        raise UserError(f"{key}: {name} is a file; give {what} (holding {required})")
    _check_readable(key, path)
    if not (path / required).is_file():
        raise UserError(f"{key}: {name} holds no {required}, so it is not {what}; point it at {what}")
    if kind.model_types:
        try:
            model_type = str(json.loads((path / required).read_text(encoding="utf-8")).get("model_type", ""))
        except (OSError, ValueError, AttributeError):
            raise UserError(
                f"{key}: {path / required} is not a readable JSON config; fix or replace it"
            ) from None
        if not model_type.startswith(kind.model_types):
            raise UserError(
                f"{key}: {name} holds a {model_type or 'untyped'} model, not {what}; point it at {what}"
            )
    _check_model_files(key, name, path)


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


def _check_model_files(key: str, name: str, path: Path) -> None:
    """The files a model folder of the right kind must also hold: its weights, and in a Stable Diffusion
    folder every part the pipeline loads. By name only; nothing is read."""
    incomplete = "the model folder is incomplete: copy or download it again"
    if key != "generator.model":
        if not _has_weights(path):
            raise UserError(f"{key}: {name} holds no weights (*.safetensors or *.bin); {incomplete}")
        return
    for part, config in SD_PARTS.items():
        folder = path / part
        if not folder.is_dir() or not any(folder.iterdir()):
            raise UserError(f"{key}: {name} has no {part} folder (or an empty one); {incomplete}")
        if config is not None and not (folder / config).is_file():
            raise UserError(f"{key}: {name} holds no {part}/{config}; {incomplete}")
        if part in _SD_WEIGHTED and not _has_weights(folder):
            raise UserError(f"{key}: {name} holds no {part} weights (*.safetensors or *.bin); {incomplete}")


def _check_detector(cfg: Config) -> None:
    """YOLO-World: a ``.pt`` file, or a folder holding one (ultralytics' own format; the rule is the
    detector's ``find_model_file``), or an asset name ultralytics downloads."""
    key, name = "detector.model", cfg.detector.model
    if is_embedded(name):
        return _check_embedded(key, name)
    path = Path(name).expanduser()
    if not path.exists():
        # ultralytics downloads a bare asset name such as yolov8s-worldv2.pt (a name with a slash is a path);
        # offline that cannot work.
        if "/" in name or os.sep in name or cfg.offline:
            raise UserError(
                f"{key}: {name} does not exist; give a local YOLO-World .pt file"
                + (" (offline: true forbids ultralytics' download)" if cfg.offline else "")
            )
        return
    _check_readable(key, path)
    try:
        find_model_file(name)
    except FileNotFoundError as exc:  # it names the key, the path and what to give instead
        raise UserError(str(exc)) from None


def check_models(cfg: Config) -> None:
    """Every model the run loads must be a known embedded model, a hub id, or a local folder of the right
    kind. Judged from the files a folder holds, without loading weights; hub ids are not looked up. Imports
    huggingface_hub for a name that is not on disk: call after ``set_offline``."""
    for key in _models_in_use(cfg):
        if key == "detector.model":
            _check_detector(cfg)
        else:
            _check_folder(key, config_value(cfg, key))


# --- the data files a config names -------------------------------------------------------------------------


def check_data_files(cfg: Config) -> None:
    """The prompter's data files and the question set must exist and the question set must validate."""
    from ccsr.questions import load_question_set

    for key in ("prompter.system_prompt", "prompter.examples", "prompter.validation_file"):
        value = config_value(cfg, key)
        if value is not None and not resolve_data_path(value).is_file():
            raise UserError(f"{key}: file {value} not found; give an existing file (see prompts/)")
    for key in ("prompter.system_prompt", "prompter.examples"):
        if config_value(cfg, key) is not None:
            _read_text(key, config_value(cfg, key))
    validation = cfg.prompter.validation_file
    if validation is not None:
        text = _read_text("prompter.validation_file", validation)
        if not text.strip():  # the evaluation would have no prompt to score, the gate nothing to compare
            raise UserError(
                f"prompter.validation_file: {validation} holds no prompt; give one prompt per line"
            )
        count = sum(1 for line in text.splitlines() if line.strip())
        if count > cfg.prompter.max_validation:
            raise UserError(
                f"prompter.validation_file: {validation} holds {count} prompts, more than "
                f"prompter.max_validation ({cfg.prompter.max_validation}); every evaluation draws each one, so "
                "shorten the file or raise prompter.max_validation on purpose"
            )
    try:
        load_question_set(cfg.judge.questions)
    except ValueError as exc:  # QuestionSet names the file, the question and the problem
        raise UserError(f"judge.questions: {exc}") from None


def _read_text(key: str, value: str) -> str:
    """The UTF-8 text of the data file ``key`` names; a binary or unreadable file is a UserError naming it."""
    try:
        text = resolve_data_path(value).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{key}: {value} cannot be read as UTF-8 text ({exc})") from None
    if "\x00" in text:
        raise UserError(f"{key}: {value} is a binary file, not UTF-8 text; give a text file")
    return text


def check_device(cfg: Config) -> None:
    """A CUDA device named by the config must be there (``auto`` picks the CPU without one)."""
    kind, _, index = cfg.device.partition(":")
    if kind != "cuda":
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count <= int(index or 0):
        found = f"{count} CUDA device(s)" if count else "no CUDA GPU (or a torch built without CUDA)"
        raise UserError(
            f"device: {cfg.device} asked for, but this machine has {found}; use device: auto or cpu"
        )


def check_config(cfg: Config) -> None:
    """Everything a run reads from outside: its device, its models (``check_models``) and data files."""
    check_device(cfg)
    check_models(cfg)
    check_data_files(cfg)
