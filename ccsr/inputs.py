"""Checks of files handed to ccsr from outside its own run bookkeeping: a training image (a LoRA's are in
``ccsr.lora``).

Each check is cheap and runs before any model is loaded. A problem raises ``InputError`` whose message starts
with the file's path, says what is wrong and what to do; the command line prints it as one line (exit code 2).

No hub library is imported at module level (see ``ccsr.cli``).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)


class InputError(ValueError):
    """A file given to ccsr cannot be used; the message reads ``<path>: <what is wrong>; <what to do>``."""


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
        raise InputError(
            f"{path}: not a readable image (cannot identify it); restore or replace it"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        # PIL reports a broken PNG chunk as SyntaxError; a non-image is UnidentifiedImageError (an OSError).
        raise InputError(f"{path}: not a readable image ({exc}); restore or replace it") from None
