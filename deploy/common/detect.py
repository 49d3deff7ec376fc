"""YOLO detection pre/post-processing in numpy (+ OpenCV for image I/O and resizing).

Mirrors Ultralytics' predict pipeline so a deployed model gives the same boxes as ``yolocomp eval``:
letterbox (centred, grey 114 padding, bilinear resize), best-class scores, class-aware NMS, boxes mapped back
to the original image. Runs on a Jetson with only numpy and OpenCV installed.
"""

from __future__ import annotations

import ast
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = {".bmp", ".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp"}
VIDEO_SUFFIXES = {".avi", ".mkv", ".mov", ".mp4", ".webm", ".m4v"}
MAX_WH = 7680  # per-class box offset for class-aware NMS in one pass (same constant as Ultralytics)


def _cv2():
    try:
        import cv2
    except ImportError as e:  # one line, with the fix
        raise SystemExit("OpenCV is required for image I/O: pip install opencv-python (JetPack ships python3-opencv)") from e
    return cv2


@dataclass
class Letterbox:
    """How an image was letterboxed: gain and padding map boxes back to the original image."""

    shape: tuple[int, int]  # original (h, w)
    gain: tuple[float, float]  # (x, y): resized size / original size, after rounding to whole pixels
    pad: tuple[int, int]  # (left, top) in pixels
    image: np.ndarray = field(repr=False)  # the padded HxWx3 uint8 image


def letterbox(img: np.ndarray, new_shape: int | tuple[int, int] = 640, pad_value: int = 114) -> Letterbox:
    """Resize keeping the aspect ratio, then pad to ``new_shape`` (h, w) with the padding split evenly."""
    cv2 = _cv2()
    if isinstance(new_shape, int):
        new_shape = (new_shape, new_shape)
    h, w = img.shape[:2]
    gain = min(new_shape[0] / h, new_shape[1] / w)
    new_w, new_h = max(round(w * gain), 1), max(round(h * gain), 1)
    dw, dh = (new_shape[1] - new_w) / 2, (new_shape[0] - new_h) / 2
    if (w, h) != (new_w, new_h):
        img = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(pad_value,) * 3)
    return Letterbox(shape=(h, w), gain=(new_w / w, new_h / h), pad=(left, top), image=img)


def to_blob(images: list[np.ndarray]) -> np.ndarray:
    """BGR HxWx3 uint8 letterboxed images -> NCHW float32 RGB in [0, 1] (the ONNX/engine input)."""
    batch = np.stack([im[..., ::-1] for im in images]).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(batch, dtype=np.float32) / 255.0


def xywh2xyxy(b: np.ndarray) -> np.ndarray:
    out = np.empty_like(b)
    out[..., :2] = b[..., :2] - b[..., 2:4] / 2
    out[..., 2:4] = b[..., :2] + b[..., 2:4] / 2
    return out


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box against many."""
    ix = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = ix * iy
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_thres: float) -> np.ndarray:
    """Greedy NMS (torchvision semantics: drop boxes with IoU > threshold); indices sorted by descending score."""
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        if order.size == 1:
            break
        rest = order[1:]
        order = rest[box_iou(boxes[i], boxes[rest]) <= iou_thres]
    return np.asarray(keep, dtype=np.int64)


def postprocess(
    pred: np.ndarray, conf: float = 0.25, iou: float = 0.7, max_det: int = 300, max_nms: int = 30000
) -> list[np.ndarray]:
    """Raw (N, 4+nc, A) output -> per image (n, 6) arrays ``x1, y1, x2, y2, score, class`` in input pixels."""
    out = []
    for p in np.asarray(pred, dtype=np.float32):
        p = p.T  # (A, 4+nc)
        cls_scores = p[:, 4:]
        cls = cls_scores.argmax(1)
        score = cls_scores[np.arange(len(p)), cls]
        keep = score > conf
        boxes, score, cls = xywh2xyxy(p[keep, :4]), score[keep], cls[keep]
        if len(score) > max_nms:
            top = np.argsort(-score, kind="stable")[:max_nms]
            boxes, score, cls = boxes[top], score[top], cls[top]
        idx = nms(boxes + cls[:, None] * MAX_WH, score, iou)[:max_det]
        out.append(np.concatenate([boxes[idx], score[idx, None], cls[idx, None].astype(np.float32)], 1))
    return out


def scale_boxes(det: np.ndarray, lb: Letterbox) -> np.ndarray:
    """Map xyxy boxes from the letterboxed input back to the original image and clip them to it."""
    det = det.copy()
    det[:, [0, 2]] = (det[:, [0, 2]] - lb.pad[0]) / lb.gain[0]
    det[:, [1, 3]] = (det[:, [1, 3]] - lb.pad[1]) / lb.gain[1]
    det[:, [0, 2]] = det[:, [0, 2]].clip(0, lb.shape[1])
    det[:, [1, 3]] = det[:, [1, 3]].clip(0, lb.shape[0])
    return det


def draw(img: np.ndarray, det: np.ndarray, names: dict[int, str], fps: float | None = None) -> np.ndarray:
    """Boxes, labels and an optional FPS counter drawn on a copy of the BGR image."""
    cv2 = _cv2()
    img = img.copy()
    for x1, y1, x2, y2, score, c in det:
        color = tuple(int(v) for v in np.random.default_rng(int(c)).integers(64, 255, 3))
        p1, p2 = (int(x1), int(y1)), (int(x2), int(y2))
        cv2.rectangle(img, p1, p2, color, 2)
        label = f"{names.get(int(c), int(c))} {score:.2f}"
        cv2.putText(img, label, (p1[0], max(p1[1] - 4, 10)), cv2.FONT_HERSHEY_SIMPLEX, 0.45, color, 1, cv2.LINE_AA)
    if fps is not None:
        cv2.putText(img, f"FPS {fps:.1f}", (8, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (0, 255, 0), 2, cv2.LINE_AA)
    return img


def parse_names(value: object) -> dict[int, str]:
    """Class names from ONNX metadata (a Python-literal dict string), engine JSON (str keys) or a list."""
    if isinstance(value, str):
        value = ast.literal_eval(value)
    if isinstance(value, list | tuple):
        return dict(enumerate(value))
    return {int(k): str(v) for k, v in dict(value or {}).items()}


def detections_json(det: np.ndarray, names: dict[int, str]) -> list[dict]:
    return [
        {"box": [round(float(v), 2) for v in d[:4]], "score": round(float(d[4]), 5), "class": int(d[5]),
         "name": names.get(int(d[5]), str(int(d[5])))}
        for d in det
    ]


def iter_source(source: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(name, BGR image)`` from an image file, a folder of images, a video file, a camera index, an
    rtsp/http stream, or a GStreamer pipeline (any source containing ``!``, e.g. a Jetson CSI camera)."""
    cv2 = _cv2()
    path = Path(source)
    gstreamer = "!" in source
    if source.isdigit() or gstreamer or path.suffix.lower() in VIDEO_SUFFIXES or source.startswith(("rtsp://", "http")):
        if source.isdigit():
            cap = cv2.VideoCapture(int(source))
        elif gstreamer:
            cap = cv2.VideoCapture(source, cv2.CAP_GSTREAMER)
        else:
            cap = cv2.VideoCapture(source)
        if not cap.isOpened():
            raise SystemExit(f"cannot open video/camera source {source!r} (check the path or device index)")
        i = 0
        try:
            while True:
                ok, frame = cap.read()
                if not ok:
                    break
                stem = "camera" + source if source.isdigit() else "stream" if gstreamer or "://" in source else path.stem
                yield f"{stem}_{i:06d}", frame
                i += 1
        finally:
            cap.release()
        return
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise SystemExit(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {source}")
    elif path.is_file():
        files = [path]
    else:
        raise SystemExit(f"source not found: {source} (give an image, a folder, a video file or a camera index)")
    for f in files:
        img = cv2.imread(str(f))
        if img is None:
            raise SystemExit(f"cannot read image {f}")
        yield f.name, img


class FpsMeter:
    """Exponential moving average of frames per second, for the on-screen overlay."""

    def __init__(self, momentum: float = 0.9):
        self.momentum, self.fps, self._last = momentum, None, None

    def tick(self) -> float | None:
        now = time.perf_counter()
        if self._last is not None:
            inst = 1.0 / max(now - self._last, 1e-9)
            self.fps = inst if self.fps is None else self.momentum * self.fps + (1 - self.momentum) * inst
        self._last = now
        return self.fps


def write_json(path: str | Path, obj: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))
    return path
