"""COCO ground truth (official json, or derived from YOLO labels) and pycocotools bbox metrics."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

from yolocomp.errors import UserError
from yolocomp.eval.dataset import ValSet

#: COCOeval.stats order for bbox
STAT_KEYS = ("ap", "ap50", "ap75", "aps", "apm", "apl", "ar1", "ar10", "ar100", "ars", "arm", "arl")


@dataclass
class GroundTruth:
    coco: object  #: pycocotools.coco.COCO
    image_ids: list[int]  #: COCO image id of each val image, in ValSet order
    class_to_category: list[int]  #: YOLO class index -> COCO category id
    source: str  #: the json path, or "yolo-labels"


def _quiet_coco(dataset: dict) -> object:
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
        coco.createIndex()
    return coco


def load_ground_truth(valset: ValSet) -> GroundTruth:
    """Official COCO json when the dataset has one, else a COCO json derived from its YOLO labels."""
    if valset.coco_json is not None:
        return from_coco_json(valset.coco_json, valset.images, len(valset.names))
    return from_yolo_labels(valset)


def from_coco_json(path: Path, images: list[Path], nc: int) -> GroundTruth:
    """Match val images to the json by file name; YOLO class i is the i-th category when ids are sorted."""
    try:
        dataset = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read COCO json {path}: {e}") from e
    if not all(k in dataset for k in ("images", "annotations", "categories")):
        raise UserError(f"{path} is not a COCO instances json (needs images, annotations, categories)")
    categories = sorted(c["id"] for c in dataset["categories"])
    if len(categories) != nc:
        raise UserError(f"{path} has {len(categories)} categories but the data yaml names {nc} classes; fix 'names' or coco_json")
    by_name = {Path(im["file_name"]).name: im["id"] for im in dataset["images"]}
    missing = [p.name for p in images if p.name not in by_name]
    if missing:
        raise UserError(f"{len(missing)} val images are not in {path} (e.g. {missing[0]}); use the json of this split")
    return GroundTruth(_quiet_coco(dataset), [by_name[p.name] for p in images], categories, str(path))


def from_yolo_labels(valset: ValSet) -> GroundTruth:
    """COCO json from YOLO labels: pixel boxes on the original image, iscrowd 0, area = w * h, image id = index."""
    from PIL import Image

    nc = len(valset.names)
    dataset: dict = {"images": [], "annotations": [], "categories": [{"id": i, "name": valset.names[i]} for i in range(nc)]}
    for image_id, path in enumerate(valset.images):
        with Image.open(path) as im:  # reads the header only
            width, height = im.size
        dataset["images"].append({"id": image_id, "file_name": path.name, "width": width, "height": height})
        label = valset.label_path(path)
        rows = label.read_text().split("\n") if label.exists() else []
        for row in filter(None, (r.split() for r in rows)):
            cls, cx, cy, w, h = int(row[0]), *(float(v) for v in row[1:5])
            if not 0 <= cls < nc:
                raise UserError(f"label {label} has class {cls} but the data yaml names {nc} classes")
            box = [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height]
            dataset["annotations"].append(
                {"id": len(dataset["annotations"]) + 1, "image_id": image_id, "category_id": cls, "bbox": box,
                 "area": box[2] * box[3], "iscrowd": 0}
            )
    return GroundTruth(_quiet_coco(dataset), list(range(len(valset.images))), list(range(nc)), "yolo-labels")


def coco_metrics(gt: GroundTruth, detections: list[dict], image_ids: list[int] | None = None) -> dict[str, float]:
    """pycocotools bbox evaluation of ``detections`` ([{image_id, category_id, bbox [x,y,w,h], score}]) on the given
    images (default: all of ``gt.image_ids``). Values are fractions; -1.0 means no ground truth in that area range."""
    from pycocotools.cocoeval import COCOeval

    ids = list(gt.image_ids if image_ids is None else image_ids)
    if not detections:
        return {k: 0.0 for k in STAT_KEYS}
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.coco.loadRes(detections)
        ev = COCOeval(gt.coco, dt, "bbox")
        ev.params.imgIds = ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: float(v) for k, v in zip(STAT_KEYS, ev.stats)}
