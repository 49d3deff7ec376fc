"""TensorRT version rules: which build a request gets on which TensorRT (8.6 through 11), checked without TensorRT.

:func:`plan_build` turns a request into a :class:`BuildPlan` or one UserError naming the problem and the fix, so the
CLI can refuse a bad request on a machine that has no TensorRT at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from yolocomp.config.export import PRECISIONS  # defined once, in the export stage config
from yolocomp.errors import UserError
from yolocomp.eval.runners.tensorrt import TENSORRT_MISSING, import_tensorrt
from yolocomp.export.calibration import check_cache_version, read_calibration_cache
from yolocomp.export.tensorrt.onnx_info import OnnxInfo, inspect_onnx

INSTALL_HINT = TENSORRT_MISSING

__all__ = ["INSTALL_HINT", "PRECISIONS", "BuildPlan", "import_tensorrt", "installed_tensorrt_version", "major_version",
           "plan_build"]


def installed_tensorrt_version() -> str | None:
    """TensorRT's version from the package metadata, without importing it (None when not installed)."""
    from importlib import metadata

    for dist in ("tensorrt", "tensorrt-cu12", "tensorrt-cu11", "tensorrt-cu13"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def major_version(version: str) -> int:
    """The major version: ``"10.3.0"`` -> 10."""
    return int(str(version).split(".")[0])


@dataclass
class BuildPlan:
    """A validated build request: every check has passed, only TensorRT's own build can still fail."""

    onnx: OnnxInfo
    engine_path: Path
    precision: str  #: resolved: fp32 / fp16 / int8
    mode: str  #: "explicit-qdq", "implicit-int8", "fp16-flag", "typed" (TensorRT 11 follows the graph) or "fp32"
    imgsz: int
    batch: int
    dla_core: int | None
    workspace_gb: float
    timing_cache: Path | None
    calibration_images: list[Path]
    calibration_cache: Path | None
    trt_version: str | None


def plan_build(
    onnx_path: str | Path,
    engine_path: str | Path,
    precision: str = "auto",
    calibration_images: Sequence[str | Path] | None = None,
    calibration_cache: str | Path | None = None,
    imgsz: int | None = None,
    batch: int = 1,
    dla_core: int | None = None,
    workspace_gb: float = 4,
    timing_cache: str | Path | None = None,
    trt_version: str | None = None,
    overwrite: bool = False,
) -> BuildPlan:
    """Check a build request and resolve ``auto`` precision; TensorRT-version rules apply when ``trt_version`` is known.

    Raises :class:`UserError` with one line naming the problem and the fix.
    """
    if precision not in PRECISIONS:
        raise UserError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    engine_path = Path(engine_path)
    if engine_path.suffix not in {".engine", ".plan"}:
        raise UserError(f"engine output {engine_path} should end in .engine (or .plan)")
    if engine_path.exists() and not overwrite:
        raise UserError(f"{engine_path} already exists; choose another output path (nothing is overwritten)")
    if batch < 1:
        raise UserError(f"batch {batch} must be >= 1")
    if workspace_gb <= 0:
        raise UserError(f"workspace {workspace_gb} GB must be > 0 (e.g. 4)")
    info = inspect_onnx(onnx_path)
    imgsz = _check_shape(info, imgsz, batch)
    trt_major = major_version(trt_version) if trt_version else None

    if info.qdq:
        if precision in ("fp32", "fp16"):
            raise UserError(f"{info.path.name} is quantized (Q/DQ nodes) and always builds INT8; use precision int8 "
                            "or auto, or export a float ONNX for an fp32/fp16 engine")
        precision, mode = "int8", "explicit-qdq"
    elif precision == "int8":
        if trt_major is not None and trt_major >= 11:
            raise UserError(f"TensorRT {trt_version} builds INT8 only from Q/DQ ONNX (implicit calibration was removed "
                            f"in 11); quantize first with `yolocomp ptq` or `yolocomp qat` and build that ONNX")
        if not calibration_images and not (calibration_cache and Path(calibration_cache).is_file()):
            raise UserError(f"{info.path.name} has no Q/DQ nodes, so INT8 needs calibration images "
                            "(--calibration-data FOLDER or data yaml) or an existing --calibration-cache")
        mode = "implicit-int8"
    elif precision in ("auto", "fp16"):
        if info.fp16:
            precision, mode = "fp16", "typed"
        elif trt_major is not None and trt_major >= 11:
            if precision == "fp16":
                raise UserError(f"TensorRT {trt_version} has no FP16 builder flag (networks are strongly typed); "
                                "convert the ONNX first (python -m modelopt.onnx.autocast --onnx_path MODEL.onnx) "
                                "or build with precision fp32")
            precision, mode = "fp32", "fp32"
        else:
            precision, mode = "fp16", "fp16-flag"
    else:
        mode = "fp32"

    if dla_core is not None:
        if not isinstance(dla_core, int) or isinstance(dla_core, bool) or dla_core < 0:
            raise UserError(f"DLA core {dla_core!r} must be 0 or 1 (Jetson Orin/Xavier have two DLA cores)")
        if precision == "fp32":
            raise UserError("DLA runs only FP16 or INT8 layers; build with precision fp16 or int8 for --dla-core")
        if trt_major is not None and trt_major >= 11:
            raise UserError(f"TensorRT {trt_version} does not support DLA; build DLA engines with the TensorRT 8.x/10.x "
                            "that ships with JetPack")

    cal_cache = Path(calibration_cache) if calibration_cache else None
    if cal_cache and cal_cache.is_file() and mode == "implicit-int8":
        cache = read_calibration_cache(cal_cache)  # a malformed cache is reported now, not deep inside TensorRT
        if trt_version:
            check_cache_version(cache, trt_version, source=str(cal_cache))
    if calibration_cache and mode != "implicit-int8":
        raise UserError("a calibration cache is only used for INT8 from a float ONNX; drop --calibration-cache")
    return BuildPlan(
        onnx=info,
        engine_path=engine_path,
        precision=precision,
        mode=mode,
        imgsz=imgsz,
        batch=batch,
        dla_core=dla_core,
        workspace_gb=float(workspace_gb),
        timing_cache=Path(timing_cache) if timing_cache else None,
        calibration_images=[Path(p) for p in calibration_images or []],
        calibration_cache=cal_cache,
        trt_version=trt_version,
    )


def _check_shape(info: OnnxInfo, imgsz: int | None, batch: int) -> int:
    n, _, h, w = info.input_shape
    if n is not None and n != batch:
        raise UserError(f"{info.path.name} has a static batch of {n}; build with batch {n} or export the ONNX "
                        f"with dynamic=True (or batch={batch})")
    if h is not None and w is not None:
        if h != w:
            raise UserError(f"{info.path.name} input is {h}x{w}; yolocomp builds square inputs (export with imgsz={max(h, w)})")
        if imgsz is not None and imgsz != h:
            raise UserError(f"{info.path.name} was exported at imgsz {h}, not {imgsz}; build with imgsz {h} "
                            f"or re-export the ONNX at {imgsz}")
        return h
    if imgsz is None:
        raise UserError(f"{info.path.name} has a dynamic input size; give imgsz (e.g. 640)")
    stride = int(info.metadata.get("stride", 32))
    if imgsz < stride or imgsz % stride:
        raise UserError(f"imgsz {imgsz} must be a positive multiple of the model stride {stride} (e.g. 640)")
    return imgsz


