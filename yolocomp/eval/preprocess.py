"""One preprocessing for every backend: Ultralytics' square letterbox (gray 114 pad), BGR->RGB, NCHW float32 / 255.

Boxes predicted on the letterboxed image go back to the original image with :func:`scale_to_original`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from yolocomp.errors import UserError


@dataclass
class Letterboxed:
    """A batch ready for a runner plus what is needed to map boxes back to each original image."""

    array: np.ndarray  #: (N, 3, imgsz, imgsz) float32 RGB in [0, 1]
    paths: list[Path]
    orig_shapes: list[tuple[int, int]]  #: (height, width) of each original image
    ratio_pads: list[tuple[tuple[float, float], tuple[int, int]]]  #: ((gain_h, gain_w), (pad_w, pad_h)) per image


def read_image(path: str | Path) -> np.ndarray:
    """Read an image as BGR uint8 (Ultralytics' reader handles the formats OpenCV alone does not)."""
    from ultralytics.utils.patches import imread

    img = imread(str(path))
    if img is None:
        raise UserError(f"cannot read image {path} (file corrupt or not an image)")
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return img[..., :3]


def letterbox(img_bgr: np.ndarray, imgsz: int) -> tuple[np.ndarray, tuple[tuple[float, float], tuple[int, int]]]:
    """Letterbox one BGR image to ``imgsz`` x ``imgsz``; return CHW float32 RGB in [0, 1] and its ratio_pad."""
    from ultralytics.data.augment import LetterBox

    box = LetterBox(new_shape=(imgsz, imgsz), auto=False, scaleup=True, center=True, padding_value=114)
    params = box.get_params({"img": img_bgr})
    out = box.apply_image({"img": img_bgr}, params)["img"]
    gain_w, gain_h = params["new_unpad"][0] / img_bgr.shape[1], params["new_unpad"][1] / img_bgr.shape[0]
    chw = np.ascontiguousarray(out[..., ::-1].transpose(2, 0, 1), dtype=np.float32) / 255.0
    return chw, ((gain_h, gain_w), (params["left"], params["top"]))


def batches(paths: Sequence[Path], imgsz: int, batch: int) -> Iterator[Letterboxed]:
    """Yield letterboxed batches of ``batch`` images (the last one may be smaller)."""
    for start in range(0, len(paths), batch):
        chunk = list(paths[start : start + batch])
        arrays, shapes, ratio_pads = [], [], []
        for p in chunk:
            img = read_image(p)
            chw, ratio_pad = letterbox(img, imgsz)
            arrays.append(chw)
            shapes.append(img.shape[:2])
            ratio_pads.append(ratio_pad)
        yield Letterboxed(np.stack(arrays), chunk, shapes, ratio_pads)


def scale_to_original(boxes_xyxy, imgsz: int, orig_shape: tuple[int, int], ratio_pad):
    """Map xyxy boxes on the letterboxed image back to the original image (clipped), in place."""
    from ultralytics.utils import ops

    return ops.scale_boxes((imgsz, imgsz), boxes_xyxy, orig_shape, ratio_pad=ratio_pad)
