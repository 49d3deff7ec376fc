"""The one image lister: folders, ``.txt`` lists of image paths, and the image splits of a data yaml.

Evaluation, calibration (PTQ, QAT, TensorRT INT8) and prune compensation all read images through it, so a data set
that one stage can read, every stage can read the same way.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import yaml
from ultralytics.data.utils import IMG_FORMATS

from yolocomp.errors import UserError

#: what Ultralytics' own val and train list as images, so an evaluation sees the images Ultralytics sees
IMAGE_SUFFIXES = frozenset(f".{f.lower()}" for f in IMG_FORMATS)


def is_image(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def list_images(
    entries: str | Path | Sequence[str | Path] | None,
    root: str | Path | None = None,
    missing_ok: bool = False,
    what: str = "images",
    source: str | Path | None = None,
) -> list[Path]:
    """Sorted images of one entry or several: a folder (searched recursively), a ``.txt`` list (one path a line, as
    Ultralytics reads them: ``./x`` relative to the list's folder, other relative lines to ``root``), or an image.

    Relative entries are under ``root`` (default: the working directory). A missing entry is a UserError naming
    ``what`` (e.g. "val images") and ``source`` (e.g. the data yaml), or skipped with ``missing_ok``. [] when no
    entry holds an image: the caller knows what that means for it.
    """
    base = Path(root) if root is not None else None
    found: list[str] = []
    for entry in entries if isinstance(entries, (list, tuple)) else [entries]:
        if entry is None or entry == "":
            continue
        p = Path(entry) if base is None or Path(entry).is_absolute() else base / entry
        if p.is_dir():
            found += [str(f) for f in p.rglob("*.*")]
        elif p.is_file() and p.suffix.lower() == ".txt":
            lines_root = base if base is not None else p.parent
            for line in filter(None, (x.strip() for x in p.read_text(encoding="utf-8-sig").splitlines())):
                found.append(line.replace("./", str(p.parent) + os.sep, 1) if line.startswith("./") else str(lines_root / line))
        elif p.is_file():
            found.append(str(p))
        elif not missing_ok:
            where = f" under {base}" if base is not None else ""
            of = f" of {source}" if source is not None else ""
            raise UserError(f"{what} '{entry}'{of} not found{where}")
    return sorted(Path(f) for f in found if is_image(f))


def dataset_images(data: str | Path | dict, split: str = "train", missing_ok: bool = False) -> list[Path]:
    """Sorted images of a split of an Ultralytics data yaml (or of its config dict with an absolute ``path``, e.g. a
    resolved yaml or Ultralytics' ``trainer.data``); the val split when the data set has no such split."""
    if isinstance(data, dict):
        cfg = data
    else:
        from yolocomp.integration import resolve_data

        with tempfile.TemporaryDirectory() as tmp:  # resolve_data validates and writes an absolute copy
            cfg = yaml.safe_load(resolve_data(data, tmp).read_text())
    used = split if cfg.get(split) else "val"
    return list_images(cfg.get(used), Path(cfg.get("path") or "."), missing_ok=missing_ok, what=f"{used} images",
                       source=None if isinstance(data, dict) else data)
