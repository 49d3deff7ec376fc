"""A small synthetic detection dataset (rendered shapes with exact boxes) for the offline demo and the tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw

CLASSES = ("square", "circle", "triangle")
_COLORS = ((230, 60, 60), (60, 200, 60), (60, 90, 230), (230, 200, 40), (200, 60, 200))


def _draw(draw: ImageDraw.ImageDraw, cls: int, box: tuple[int, int, int, int], color: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    if cls == 0:
        draw.rectangle(box, fill=color)
    elif cls == 1:
        draw.ellipse(box, fill=color)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=color)


def render_image(rng: np.random.Generator, size: int, max_objects: int) -> tuple[Image.Image, list[tuple[int, list[float]]]]:
    """One image and its boxes as ``(class, [x, y, w, h])`` in pixels."""
    background = rng.integers(0, 60, (size, size, 3), dtype=np.uint8) + rng.integers(0, 120, (1, 1, 3), dtype=np.uint8)
    img = Image.fromarray(background)
    draw = ImageDraw.Draw(img)
    boxes: list[tuple[int, list[float]]] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        side = int(rng.integers(size // 8, size // 3))
        x0, y0 = (int(v) for v in rng.integers(0, size - side, 2))
        box = (x0, y0, x0 + side - 1, y0 + side - 1)
        if any(_iou(box, (b[0], b[1], b[0] + b[2] - 1, b[1] + b[3] - 1)) > 0.3 for _, b in boxes):
            continue
        cls = int(rng.integers(0, len(CLASSES)))
        _draw(draw, cls, box, _COLORS[int(rng.integers(0, len(_COLORS)))])
        boxes.append((cls, [float(x0), float(y0), float(side), float(side)]))
    return img, boxes


def _iou(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def make_dataset(root: str | Path, train: int = 64, val: int = 16, size: int = 128, max_objects: int = 3, seed: int = 0) -> Path:
    """Write images, YOLO labels, a COCO json for val and an absolute-path data yaml; return the yaml path.

    Deterministic for a given seed; an existing complete dataset is reused, not rewritten.
    """
    root = Path(root).resolve()
    data_yaml = root / "data.yaml"
    if data_yaml.exists() and (root / "annotations" / "instances_val.json").exists():
        return data_yaml
    rng = np.random.default_rng(seed)
    coco = {"images": [], "annotations": [], "categories": [{"id": i, "name": n} for i, n in enumerate(CLASSES)]}
    for split, count in (("train", train), ("val", val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            img, boxes = render_image(rng, size, max_objects)
            name = f"{split}_{i:04d}"
            img.save(root / "images" / split / f"{name}.png")
            lines = [f"{c} {(x + w / 2) / size:.6f} {(y + h / 2) / size:.6f} {w / size:.6f} {h / size:.6f}" for c, (x, y, w, h) in boxes]
            (root / "labels" / split / f"{name}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
            if split == "val":
                coco["images"].append({"id": i, "file_name": f"{name}.png", "width": size, "height": size})
                for c, b in boxes:
                    coco["annotations"].append(
                        {"id": len(coco["annotations"]) + 1, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
                    )
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / "instances_val.json").write_text(json.dumps(coco))
    cfg = {
        "path": str(root),
        "train": "images/train",
        "val": "images/val",
        "names": dict(enumerate(CLASSES)),
        "coco_json": "annotations/instances_val.json",
    }
    data_yaml.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return data_yaml
