"""One Ultralytics data yaml over a labelled data set, a set of unlabelled images, or both."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from yolocomp.data.classes import check_classes, class_names
from yolocomp.data.images import check_images
from yolocomp.data.mirror import mirror_images, write_empty_labels
from yolocomp.data.pseudo_labels import write_pseudo_labels
from yolocomp.errors import UserError

#: Ultralytics validates the final epoch even with ``val=False``; a label-free run's val split only has to exist,
#: so it holds a few of the images rather than all of them (validated twice at the end of training).
LABEL_FREE_VAL_IMAGES = 16


@dataclass
class TrainingData:
    """What training reads: ``yaml`` (absolute-path Ultralytics data yaml) and what its train split holds."""

    yaml: Path
    labelled: int  #: train images of the labelled data set
    unlabelled: int  #: images from ``--images``
    pseudo_labelled: int  #: unlabelled images that got at least one teacher box
    label_free: bool  #: no train image has a label: train with :func:`yolocomp.data.label_free_overrides`


def _teacher_model(teacher: Any) -> Any:
    from yolocomp.integration import load_model

    return load_model(teacher)


def _absolute_entries(cfg: dict, split: str) -> list[str]:
    entries = cfg.get(split) or []
    root = Path(cfg["path"])
    return [str(e if Path(str(e)).is_absolute() else root / str(e)) for e in (entries if isinstance(entries, list) else [entries])]


def training_data(
    images: str | Path | None,
    data: str | Path | None,
    workdir: str | Path,
    *,
    teacher: Any = None,
    pseudo_conf: float | None = None,
    imgsz: int = 640,
    device: str = "cpu",
) -> TrainingData:
    """The training data of a compression stage.

    * only ``data``: the resolved data yaml (:func:`yolocomp.integration.resolve_data`);
    * only ``images``: train = those images without labels (label-free unless pseudo-labelled), names from the
      teacher (required), val = a few of the same images (train with ``val=False``: no labels, no metrics);
    * both: train = the unlabelled images and the data's train images, val and names from the data (the teacher,
      when given, must predict the same classes).

    The images are linked into ``workdir/unlabelled/images`` (the source is never written); their labels, in
    ``workdir/unlabelled/labels``, are the teacher's detections with confidence >= ``pseudo_conf`` when it and a
    teacher are given, else empty files. ``teacher``: a checkpoint path or a DetectionModel.
    """
    from yolocomp.eval.images import dataset_images
    from yolocomp.integration import resolve_data
    from yolocomp.integration.io import SOURCE_KEY

    workdir = Path(workdir).resolve()
    if images is None and data is None:
        raise UserError("no training data: give --data (a labelled data yaml), --images (a folder of images) or both")
    if pseudo_conf is not None and not 0 < pseudo_conf < 1:
        raise UserError(f"pseudo_conf={pseudo_conf} is outside (0, 1); use e.g. 0.25")
    if images is None:
        resolved = resolve_data(data, workdir)
        cfg = yaml.safe_load(resolved.read_text())
        labelled = len(dataset_images(cfg, "train")) if cfg.get("train") else 0
        return TrainingData(resolved, labelled, 0, 0, label_free=False)

    sources = check_images(images)
    if teacher is None and (data is None or pseudo_conf is not None):
        need = "its class names name the images' classes" if data is None else "it writes the pseudo-labels"
        raise UserError(f"--images {images} needs a teacher ({need}); pass --teacher or a model to distil from")
    teacher_model = _teacher_model(teacher) if teacher is not None else None
    if data is not None:
        cfg = yaml.safe_load(resolve_data(data, workdir).read_text())
        if teacher_model is not None:
            label = "the teacher" if isinstance(teacher, nn.Module) else f"teacher {teacher}"
            check_classes(teacher_model.names, cfg["names"], teacher=label, data=str(data))
    links = mirror_images(sources, workdir / "unlabelled")
    pseudo = 0
    if pseudo_conf is not None:
        pseudo, _ = write_pseudo_labels(links, teacher_model, pseudo_conf, imgsz=imgsz, device=device)
    else:
        write_empty_labels(links)
    mirror = workdir / "unlabelled"

    if data is None:
        val = mirror / "val.txt"
        val.write_text("".join(f"{p}\n" for p in links[:LABEL_FREE_VAL_IMAGES]))
        out = {"path": str(mirror), "train": str(mirror / "images"), "val": str(val),
               "names": dict(enumerate(class_names(teacher_model.names))), SOURCE_KEY: str(images)}
        labelled = 0
    else:
        labelled = len(dataset_images(cfg, "train")) if cfg.get("train") else 0
        # unlabelled first: Ultralytics writes the train label cache beside the first image's labels, i.e. in workdir
        train = [str(mirror / "images"), *(_absolute_entries(cfg, "train") if labelled else [])]
        out = {**cfg, "train": train, "val": _absolute_entries(cfg, "val")}
    path = workdir / "training_data.yaml"
    path.write_text(yaml.safe_dump(out, sort_keys=False))
    return TrainingData(path, labelled, len(links), pseudo, label_free=labelled == 0 and pseudo == 0)
