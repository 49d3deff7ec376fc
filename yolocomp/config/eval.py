"""Options of COCO evaluation (``yolocomp eval`` and the measurement of every stage model in ``yolocomp run``)."""

from __future__ import annotations

from dataclasses import dataclass

from yolocomp.config.options import option, positive, valid_fraction


@dataclass
class EvalConfig:
    conf: float = option(0.001, "confidence threshold before NMS", hint="use a confidence threshold such as 0.001",
                         check=valid_fraction)
    iou: float = option(0.7, "NMS IoU threshold", hint="use an IoU threshold such as 0.7", check=valid_fraction)
    max_det: int = option(300, "detections kept per image", hint="use a detection limit such as 300", check=positive)
    images: int | None = option(None, "evaluate only the first N images (unset: all)",
                                hint="use a number of images or null for all", check=positive)
    batch: int = option(8, "images per inference batch", hint="use a batch size such as 8", check=positive)
    threads: int | None = option(None, "CPU threads (unset: all)", hint="use a CPU thread count or null", check=positive)
