"""``evaluate``: COCO AP of a .pt / .onnx / .engine / in-memory model with one preprocessing and one NMS for all."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from yolocomp.errors import UserError
from yolocomp.eval.coco import GroundTruth, coco_metrics, load_ground_truth
from yolocomp.eval.dataset import load_valset
from yolocomp.eval.metrics import ap_summary
from yolocomp.eval.preprocess import batches, scale_to_original
from yolocomp.eval.runners import make_runner


def check_settings(imgsz: int, batch: int, conf: float, iou: float, max_det: int) -> None:
    """One-line errors for impossible settings, before any work starts."""
    if not isinstance(imgsz, int) or imgsz < 32 or imgsz % 32:
        raise UserError(f"imgsz={imgsz}: use a multiple of 32 (the detector's largest stride), e.g. 640")
    if batch < 1:
        raise UserError(f"batch={batch}: use 1 or more")
    if not 0 <= conf < 1:
        raise UserError(f"conf={conf} is outside [0, 1); the COCO default is 0.001")
    if not 0 < iou <= 1:
        raise UserError(f"iou={iou} is outside (0, 1]; the default is 0.7")
    if max_det < 1:
        raise UserError(f"max_det={max_det}: use 1 or more; COCO counts up to 100, the default keeps 300")


def non_max_suppression(preds: Any, conf: float, iou: float, max_det: int, multi_label: bool = True) -> list:
    """Ultralytics' NMS (class-aware) on raw decoded outputs (numpy or tensor): one (n, 6) xyxy-conf-cls tensor per
    image. Evaluation, pseudo-labelling and distillation masks all run this one."""
    import torch
    import torchvision  # noqa: F401  (Ultralytics' NMS uses torchvision's C++ kernel only when it is imported)
    from ultralytics.utils import nms

    from yolocomp.integration.threads import keep_threads

    if not isinstance(preds, torch.Tensor):
        preds = torch.from_numpy(np.ascontiguousarray(preds, dtype=np.float32))
    with keep_threads():
        torch.set_num_threads(1)  # many tiny ops: one thread is ~5x faster than two contending ones on a busy CPU
        return nms.non_max_suppression(
            preds.float(),
            conf,
            iou,
            multi_label=multi_label,
            agnostic=False,
            max_det=max_det,
            max_time_img=60.0,  # Ultralytics stops NMS after ~2 s per batch; on a busy CPU that silently drops images
        )


def detections_for_batch(
    preds: np.ndarray, batch: Any, gt: GroundTruth, image_ids: list[int], imgsz: int, conf: float, iou: float, max_det: int
) -> list[dict]:
    """Ultralytics' NMS (multi-label, as its DetectionValidator) on raw outputs, boxes mapped to original images."""
    from ultralytics.utils import ops

    outputs = non_max_suppression(preds, conf, iou, max_det, multi_label=True)
    dets: list[dict] = []
    for out, shape, ratio_pad, image_id in zip(outputs, batch.orig_shapes, batch.ratio_pads, image_ids):
        if not len(out):
            continue
        boxes = ops.xyxy2ltwh(scale_to_original(out[:, :4].clone(), imgsz, shape, ratio_pad))
        for box, score, cls in zip(boxes.tolist(), out[:, 4].tolist(), out[:, 5].long().tolist()):
            dets.append(
                {"image_id": image_id, "category_id": gt.class_to_category[cls], "bbox": [round(v, 3) for v in box],
                 "score": round(score, 5)}
            )
    return dets


def evaluate(
    model: Any,
    data: str | Path,
    imgsz: int = 640,
    device: str = "cpu",
    batch: int = 8,
    conf: float = 0.001,
    iou: float = 0.7,
    max_det: int = 300,
    images: int | None = None,
    json_out: str | Path | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> dict:
    """COCO bbox metrics of ``model`` on the val split of ``data`` (an Ultralytics data yaml).

    ``model``: a ``.pt`` / ``.onnx`` / ``.engine`` path, an OpenVINO folder / ``.xml`` or an in-memory DetectionModel. Returns (and writes to
    ``json_out``) ``ap, ap50, ap75, aps, apm, apl, ar100`` as fractions, ``backend``, ``images``, ``settings``,
    ``model``, ``data`` and ``seconds``.
    """
    from ultralytics.utils import NUM_THREADS

    from yolocomp.integration.threads import keep_threads

    check_settings(imgsz, batch, conf, iou, max_det)
    valset = load_valset(data, images)
    # Ultralytics' val runs CPU inference on cpu_count - 1 threads (max 8); all threads contending with other work
    # made the same evaluation up to 2.5x slower here. The caller's torch thread count is restored at the end.
    threads = int(threads or NUM_THREADS)
    with keep_threads():
        return _evaluate(model, data, valset, imgsz, device, batch, conf, iou, max_det, images, json_out, threads, progress)


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for dist in ("yolocomp", "ultralytics", "torch", "onnxruntime", "openvino", "pycocotools"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _evaluate(model, data, valset, imgsz, device, batch, conf, iou, max_det, images, json_out, threads, progress) -> dict:
    from tqdm import tqdm

    from yolocomp.integration.io import data_label

    runner = make_runner(model, device, threads)
    if getattr(runner, "fixed_imgsz", None) and runner.fixed_imgsz != imgsz:
        raise UserError(f"{runner.source} takes {runner.fixed_imgsz}px input; pass --imgsz {runner.fixed_imgsz} or re-export")
    nc = len(valset.names)
    if getattr(runner, "nc", 0) and runner.nc != nc:
        raise UserError(f"model {runner.source} predicts {runner.nc} classes but {data_label(data)} names {nc}; use "
                        "matching data")
    gt = load_ground_truth(valset)

    start = time.perf_counter()
    detections: list[dict] = []
    ids = iter(gt.image_ids)
    bar = tqdm(total=len(valset.images), desc=f"eval {runner.backend}", unit="img", disable=not progress)
    for b in batches(valset.images, imgsz, batch):
        preds = runner(b.array)
        detections += detections_for_batch(preds, b, gt, [next(ids) for _ in b.paths], imgsz, conf, iou, max_det)
        bar.update(len(b.paths))
    bar.close()
    metrics = coco_metrics(gt, detections)
    result = {
        **ap_summary(metrics),
        "backend": runner.backend,
        "images": len(valset.images),
        "detections": len(detections),
        "model": runner.source,
        "data": data_label(data),
        "seconds": round(time.perf_counter() - start, 2),
        "settings": {
            "imgsz": imgsz,
            "batch": batch,
            "conf": conf,
            "iou": iou,
            "max_det": max_det,
            "device": str(getattr(runner, "device", device)),
            "threads": threads,
            "images_limit": images,
            "annotations": gt.source,
            "preprocess": "square letterbox (gray 114, centered), RGB, /255",
            "nms": "ultralytics non_max_suppression, multi_label=True, class-aware",
            "metric": "pycocotools COCOeval bbox",
            "fused": getattr(runner, "fused", None),
            "providers": getattr(runner, "providers", None),
            "versions": _versions(),
        },
        "all_stats": metrics,
    }
    if json_out is not None:
        out = Path(json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
    return result
