"""The images a user hands over for training without labels (``--images``): a folder or a ``.txt`` list."""

from __future__ import annotations

import os
from pathlib import Path

from yolocomp.errors import UserError
from yolocomp.eval.images import list_images

_FIX = "give a folder of .jpg/.png images or a .txt list of image paths"


def check_images(source: str | Path, flag: str = "--images") -> list[Path]:
    """Sorted image paths of ``source`` (a folder, searched recursively, or a ``.txt`` list, one path a line).

    A missing, unreadable or empty source, or a list naming files that do not exist, is a one-line UserError naming
    ``flag`` and the path.
    """
    path = Path(source)
    if not path.exists():
        raise UserError(f"{flag} {source}: not found ({_FIX})")
    if path.is_dir() and not os.access(path, os.R_OK | os.X_OK):
        raise UserError(f"{flag} {source}: folder not readable (check its permissions, or {_FIX})")
    try:
        images = list_images(path)
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise UserError(f"{flag} {source}: cannot read it ({reason}; {_FIX})") from None
    if not images:
        raise UserError(f"{flag} {source}: no images found ({_FIX})")
    if path.is_file():  # a list may name files that are gone; a folder only lists what exists
        missing = [p for p in images if not p.is_file()]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise UserError(f"{flag} {source}: lists missing image {missing[0]}{more} (fix the list or restore the files)")
    return images
