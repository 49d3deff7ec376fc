"""Read an Ultralytics data yaml into the list of validation images, their YOLO labels and the COCO json (if any)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from yolocomp.errors import UserError
from yolocomp.eval.images import list_images


@dataclass
class ValSet:
    """The validation split of a dataset, images sorted by path."""

    yaml_path: Path
    root: Path
    names: dict[int, str]
    images: list[Path]
    coco_json: Path | None  #: official COCO annotations for these images, when the dataset has them

    def label_path(self, image: Path) -> Path:
        """YOLO label file of an image (Ultralytics' rule: last ``/images/`` becomes ``/labels/``, suffix ``.txt``)."""
        from ultralytics.data.utils import img2label_paths

        return Path(img2label_paths([str(image)])[0])


def load_valset(data: str | Path, images: int | None = None) -> ValSet:
    """Resolve ``data`` (an Ultralytics data yaml) and list its val images; ``images=N`` keeps the first N (sorted)."""
    from yolocomp.integration import resolve_data

    with tempfile.TemporaryDirectory() as tmp:  # resolve_data validates and writes an absolute copy; we only read it
        cfg = yaml.safe_load(resolve_data(data, tmp).read_text())
    root = Path(cfg["path"])
    names = cfg["names"]
    if isinstance(names, list):
        names = dict(enumerate(names))
    files = _image_files(root, cfg["val"], data)
    if images is not None:
        if images < 1:
            raise UserError(f"images={images}: give a positive number of images to evaluate (or leave it unset for all)")
        files = files[:images]
    return ValSet(Path(data), root, {int(k): str(v) for k, v in names.items()}, files, _coco_json(root, cfg, data))


def _image_files(root: Path, val: str | list, data: str | Path) -> list[Path]:
    files = list_images(val, root, what="val images", source=data)
    if not files:
        from yolocomp.integration.io import data_label

        raise UserError(f"no val images found in '{val}' of {data_label(data)} (expected a folder of images or a .txt list)")
    return files


def _coco_json(root: Path, cfg: dict, data: str | Path) -> Path | None:
    """The dataset's official COCO json: the yaml's ``coco_json`` key, else ``annotations/instances_<val>.json``."""
    if cfg.get("coco_json"):
        path = Path(cfg["coco_json"])
        path = path if path.is_absolute() else root / path
        if not path.exists():
            raise UserError(f"coco_json '{cfg['coco_json']}' of {data} not found under {root}")
        return path
    val = cfg["val"][0] if isinstance(cfg["val"], list) else cfg["val"]
    candidate = root / "annotations" / f"instances_{Path(str(val)).stem}.json"  # COCO layout: images/val2017 or val2017.txt
    return candidate if candidate.exists() else None
