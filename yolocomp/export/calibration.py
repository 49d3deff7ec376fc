"""INT8 calibration without TensorRT: the calibration-cache file format, and the letterboxed calibration batches.

TensorRT's calibrators store per-tensor scales as text: a header ``TRT-<version>-<Algorithm>`` and one line per tensor,
``name: <hex of the float32 scale's bits>`` (``3c010a14`` is 0.00787). TensorRT rejects a cache whose header version is
not its own, so :func:`check_cache_version` tells the user before a build silently recalibrates.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from yolocomp.errors import UserError
from yolocomp.eval.images import IMAGE_SUFFIXES, dataset_images, list_images

DEFAULT_ALGORITHM = "EntropyCalibration2"
_HEADER = re.compile(r"^TRT-(\d+)-(\w+)$")

__all__ = ["DEFAULT_ALGORITHM", "IMAGE_SUFFIXES", "CalibrationCache", "calibration_batches", "check_cache_version",
           "find_calibration_images", "read_calibration_cache", "trt_version_code", "write_calibration_cache"]


def trt_version_code(version: str) -> int:
    """TensorRT's integer version as written in cache headers: 8.6.1 -> 8601, 10.3.0 -> 100300 (major*10000 from 10)."""
    parts = [int(p) for p in re.findall(r"\d+", str(version))[:3]] + [0, 0]
    major, minor, patch = parts[:3]
    return major * 10000 + minor * 100 + patch if major >= 10 else major * 1000 + minor * 100 + patch


@dataclass
class CalibrationCache:
    """Parsed cache: TensorRT version code, algorithm name and per-tensor float32 scales (insertion order kept)."""

    version: int
    algorithm: str = DEFAULT_ALGORITHM
    scales: dict[str, float] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        lines = [f"TRT-{self.version}-{self.algorithm}"]
        # TensorRT prints the float's bits as an unpadded hex integer (a zero scale is written as "0")
        lines += [f"{name}: {struct.unpack('>I', struct.pack('>f', scale))[0]:x}" for name, scale in self.scales.items()]
        return ("\n".join(lines) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "calibration cache") -> CalibrationCache:
        text = data.decode("utf-8", errors="strict") if isinstance(data, bytes | bytearray) else str(data)
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        match = _HEADER.match(lines[0]) if lines else None
        if not match:
            raise UserError(f"{source} is not a TensorRT calibration cache (first line should look like "
                            f"TRT-8601-{DEFAULT_ALGORITHM}); delete it to recalibrate")
        scales: dict[str, float] = {}
        for ln in lines[1:]:
            name, sep, value = ln.rpartition(":")  # tensor names may contain ':' themselves
            value = value.strip()
            if not sep or not re.fullmatch(r"[0-9a-fA-F]{1,8}", value):
                raise UserError(f"{source}: bad line {ln!r} (expected 'tensor_name: hex_scale'); delete it to recalibrate")
            scales[name.strip()] = struct.unpack(">f", bytes.fromhex(value.zfill(8)))[0]
        return cls(int(match.group(1)), match.group(2), scales)


def write_calibration_cache(path: str | Path, cache: CalibrationCache) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cache.to_bytes())
    return path


def read_calibration_cache(path: str | Path) -> CalibrationCache:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"calibration cache not found: {path}")
    return CalibrationCache.from_bytes(path.read_bytes(), source=str(path))


def check_cache_version(cache: CalibrationCache, trt_version: str, source: str = "calibration cache") -> None:
    """Raise if TensorRT ``trt_version`` would reject the cache (it only accepts its own version)."""
    want = trt_version_code(trt_version)
    if cache.version != want:
        raise UserError(f"{source} was written by TensorRT code {cache.version}, this is TensorRT {trt_version} "
                        f"(code {want}); delete the cache or pass another --calibration-cache path to recalibrate")
    if cache.algorithm != DEFAULT_ALGORITHM:
        raise UserError(f"{source} holds {cache.algorithm} scales, the engine builder uses {DEFAULT_ALGORITHM}; "
                        "delete it to recalibrate")


def find_calibration_images(source: str | Path | Sequence[str | Path], limit: int | None = 500) -> list[Path]:
    """Images from a folder (recursive), an Ultralytics data yaml (its train split) or a list of paths; sorted, capped."""
    if isinstance(source, list | tuple):
        files = [Path(p) for p in source]
        missing = [p for p in files if not p.is_file()]
        if missing:
            raise UserError(f"calibration image not found: {missing[0]}")
    else:
        path = Path(source)
        if path.suffix.lower() in {".yaml", ".yml"}:
            files = dataset_images(path, "train")
        elif path.is_dir():
            files = list_images(path)
        else:
            raise UserError(f"calibration data not found: {source} (give a folder of images or a data yaml)")
    if not files:
        raise UserError(f"no images in calibration data {source} (need a few hundred representative images)")
    if limit is not None and limit < 1:
        raise UserError(f"calibration image limit {limit} must be >= 1 (e.g. 500)")
    return files[:limit] if limit else files


def calibration_batches(images: Sequence[Path], imgsz: int, batch: int) -> Iterator[np.ndarray]:
    """Letterboxed (batch, 3, imgsz, imgsz) float32 RGB batches, the same preprocessing as evaluation.

    A last incomplete batch is dropped: a static-batch engine cannot take it and it adds nothing to the histograms.
    """
    from yolocomp.eval.preprocess import letterbox, read_image

    for start in range(0, len(images) - batch + 1, batch):
        yield np.stack([letterbox(read_image(p), imgsz)[0] for p in images[start : start + batch]])
