"""Pseudo-labels: the teacher's confident detections written as YOLO label files, one image batch at a time."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from yolocomp.data.mirror import label_path


def yolo_label_lines(detections: Any, orig_shape: tuple[int, int]) -> list[str]:
    """``class cx cy w h`` lines (normalised to the original image) of (n, 6) xyxy-conf-cls detections in original
    image pixels."""
    h, w = orig_shape
    lines = []
    for x1, y1, x2, y2, _conf, cls in detections.tolist():
        bw, bh = (x2 - x1) / w, (y2 - y1) / h
        if bw <= 0 or bh <= 0:
            continue  # clipped to nothing at the image border
        lines.append(f"{int(cls)} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {bw:.6f} {bh:.6f}")
    return lines


def write_pseudo_labels(links: Sequence[Path], teacher: Any, conf: float, imgsz: int = 640, device: str = "cpu",
                        batch: int = 8, iou: float = 0.7, max_det: int = 300) -> tuple[int, int]:
    """Label file for every linked image from the teacher's detections with confidence >= ``conf``; letterboxed
    inference and NMS as in evaluation (one class per box, as Ultralytics' predict). Streams batches: neither images
    nor predictions are kept. Returns (images with at least one box, boxes written)."""
    from yolocomp.eval.evaluate import non_max_suppression
    from yolocomp.eval.preprocess import batches, scale_to_original
    from yolocomp.eval.runners import make_runner

    runner = make_runner(teacher, device)
    labelled = boxes = 0
    for b in batches(list(links), imgsz, batch):
        outputs = non_max_suppression(runner(b.array), conf, iou, max_det, multi_label=False)
        for link, out, shape, ratio_pad in zip(b.paths, outputs, b.orig_shapes, b.ratio_pads):
            out[:, :4] = scale_to_original(out[:, :4].clone(), imgsz, shape, ratio_pad)
            lines = yolo_label_lines(out, shape)
            label_path(link).write_text("".join(f"{ln}\n" for ln in lines))
            labelled += bool(lines)
            boxes += len(lines)
    return labelled, boxes
