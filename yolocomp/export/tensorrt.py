"""TensorRT engines from yolocomp's ONNX files, their metadata, and a runner for evaluation and benchmarks.

Three build paths, chosen from the ONNX graph and the installed TensorRT (8.6 through 11):

* Q/DQ ONNX (``yolocomp ptq`` / ``qat``) -> explicit-quantization INT8 engine. Works on every version; on TensorRT
  <= 10 the INT8 and FP16 builder flags are set so layers outside Q/DQ pairs may run in FP16; TensorRT 11 networks
  are strongly typed and follow the graph's own types.
* Float ONNX + ``fp16`` -> FP16 engine (builder flag, TensorRT <= 10). TensorRT 11 removed the flag: convert the
  ONNX to FP16 first (ModelOpt AutoCast) or build FP32.
* Float ONNX + ``int8`` on TensorRT <= 10 -> implicit INT8 with an ``IInt8EntropyCalibrator2`` over letterboxed
  calibration images and a reusable calibration cache. TensorRT 11 removed implicit INT8: it is refused.

:func:`export_engine` validates everything before TensorRT is imported, so the CLI's errors do not need TensorRT.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from yolocomp.errors import UserError
from yolocomp.export.calibration import (
    CalibrationCache,
    calibration_batches,
    check_cache_version,
    find_calibration_images,
    read_calibration_cache,
)

INSTALL_HINT = "TensorRT is not installed: pip install 'yolocomp[tensorrt]' on a machine with an NVIDIA GPU"
PRECISIONS = ("auto", "fp32", "fp16", "int8")
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}


# --------------------------------------------------------------------------------------------------- TensorRT import
def import_tensorrt() -> Any:
    """The ``tensorrt`` module, or a UserError saying how to install it."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:  # OSError: the wheel is there but libnvinfer cannot be loaded
        raise UserError(INSTALL_HINT) from e
    return trt


def installed_tensorrt_version() -> str | None:
    """TensorRT's version from the package metadata, without importing it (None when not installed)."""
    from importlib import metadata

    for dist in ("tensorrt", "tensorrt-cu12", "tensorrt-cu11", "tensorrt-cu13"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _major(version: str) -> int:
    return int(str(version).split(".")[0])


# --------------------------------------------------------------------------------------------------- ONNX inspection
@dataclass
class OnnxInfo:
    """What the build needs to know about an ONNX file, read with the ``onnx`` package only."""

    path: Path
    qdq: bool  #: has QuantizeLinear/DequantizeLinear nodes (explicit quantization)
    fp16: bool  #: the graph input is float16 (already converted, e.g. by ModelOpt AutoCast)
    input_name: str
    input_shape: list[int | None]  #: None for a dynamic axis
    metadata: dict[str, str] = field(default_factory=dict)  #: Ultralytics metadata_props (names, stride, imgsz, ...)


def inspect_onnx(path: str | Path) -> OnnxInfo:
    import onnx

    path = Path(path)
    if not path.is_file():
        raise UserError(f"ONNX model not found: {path} (export one first: yolocomp export --format onnx)")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError and friends
        raise UserError(f"cannot read ONNX model {path}: {type(e).__name__} (file corrupt or not ONNX)") from e
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise UserError(f"{path} has {len(inputs)} inputs; a YOLO detector ONNX has one image input")
    tensor_type = inputs[0].type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor_type.shape.dim]
    if len(shape) != 4 or shape[1] not in (3, None):
        raise UserError(f"{path} input {inputs[0].name} has shape {shape}; expected (N, 3, H, W) images")
    return OnnxInfo(
        path=path,
        qdq=any(n.op_type in QDQ_OPS for n in model.graph.node),
        fp16=tensor_type.elem_type == onnx.TensorProto.FLOAT16,
        input_name=inputs[0].name,
        input_shape=shape,
        metadata={p.key: p.value for p in model.metadata_props},
    )


# --------------------------------------------------------------------------------------------------- build plan
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
    major = _major(trt_version) if trt_version else None

    if info.qdq:
        if precision in ("fp32", "fp16"):
            raise UserError(f"{info.path.name} is quantized (Q/DQ nodes) and always builds INT8; use precision int8 "
                            "or auto, or export a float ONNX for an fp32/fp16 engine")
        precision, mode = "int8", "explicit-qdq"
    elif precision == "int8":
        if major is not None and major >= 11:
            raise UserError(f"TensorRT {trt_version} builds INT8 only from Q/DQ ONNX (implicit calibration was removed "
                            f"in 11); quantize first with `yolocomp ptq` or `yolocomp qat` and build that ONNX")
        if not calibration_images and not (calibration_cache and Path(calibration_cache).is_file()):
            raise UserError(f"{info.path.name} has no Q/DQ nodes, so INT8 needs calibration images "
                            "(--calibration-data FOLDER or data yaml) or an existing --calibration-cache")
        mode = "implicit-int8"
    elif precision in ("auto", "fp16"):
        if info.fp16:
            precision, mode = "fp16", "typed"
        elif major is not None and major >= 11:
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
        if major is not None and major >= 11:
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


# --------------------------------------------------------------------------------------------------- metadata
def metadata_path(engine_path: str | Path) -> Path:
    """``model.engine`` -> ``model.engine.json``."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def engine_metadata(plan: BuildPlan, trt_version: str, extra: dict | None = None) -> dict:
    """Names, image size, stride, precision, batch and versions, read from the ONNX's Ultralytics metadata."""
    import ast

    from yolocomp import __version__

    meta = plan.onnx.metadata
    names = ast.literal_eval(meta["names"]) if "names" in meta else {}
    return {
        **_onnx_complexity(plan.onnx.path, plan.imgsz),
        "task": meta.get("task", "detect"),
        "names": {int(k): str(v) for k, v in (dict(enumerate(names)) if isinstance(names, list) else names).items()},
        "imgsz": [plan.imgsz, plan.imgsz],
        "stride": int(meta.get("stride", 32)),
        "precision": plan.precision,
        "build_mode": plan.mode,
        "batch": plan.batch,
        "dla_core": plan.dla_core,
        "tensorrt": trt_version,
        "source_onnx": str(plan.onnx.path.resolve()),
        "yolocomp": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **(extra or {}),
    }


def _onnx_complexity(path: Path, imgsz: int) -> dict:
    """Params and GFLOPs of the source graph (an engine cannot be inspected for them); empty if not countable."""
    try:
        from yolocomp.eval.onnx_stats import onnx_stats

        stats = onnx_stats(path, imgsz)
    except Exception:  # optional information: an exotic graph must not stop the build
        return {}
    return {"params": stats["params"], "gflops": stats["gflops"]}


def write_engine_metadata(engine_path: str | Path, metadata: dict) -> Path:
    path = metadata_path(engine_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metadata, indent=2))
    return path


def read_engine_metadata(engine_path: str | Path) -> dict:
    """The JSON stored beside an engine, with class-name keys back to ints; UserError if it is missing or broken."""
    path = metadata_path(engine_path)
    if not path.is_file():
        raise UserError(f"engine metadata not found: {path} (build engines with yolocomp export or "
                        "deploy/jetson/build_engine.sh, which write it)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"engine metadata {path} is not valid JSON ({e.msg}); rebuild the engine") from e
    meta["names"] = {int(k): v for k, v in (meta.get("names") or {}).items()}
    return meta


# --------------------------------------------------------------------------------------------------- building
def build_engine(
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
    metadata: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Build a serialized TensorRT engine from ONNX and write ``<engine>.json`` metadata beside it; return its path.

    ``imgsz``: None takes a static ONNX's size (a dynamic ONNX needs it); ``metadata`` adds keys to the JSON.
    """
    trt = import_tensorrt()
    plan = plan_build(onnx_path, engine_path, precision, calibration_images, calibration_cache, imgsz, batch,
                      dla_core, workspace_gb, timing_cache, trt_version=trt.__version__, overwrite=overwrite)
    return _build(trt, plan, metadata)


def _build(trt: Any, plan: BuildPlan, extra_metadata: dict | None) -> Path:
    major = _major(trt.__version__)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if major < 10:  # explicit batch is the only mode from 10 on (the flag is deprecated there)
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(plan.onnx.path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT cannot parse {plan.onnx.path.name}: {errors}")

    config = builder.create_builder_config()
    if hasattr(config, "set_memory_pool_limit"):
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(plan.workspace_gb * (1 << 30)))
    else:  # TensorRT < 8.4
        config.max_workspace_size = int(plan.workspace_gb * (1 << 30))

    profile = None
    inp = network.get_input(0)
    if any(d == -1 for d in inp.shape):  # dynamic ONNX: one profile from batch 1 to the requested batch
        profile = builder.create_optimization_profile()
        shape = (plan.batch, 3, plan.imgsz, plan.imgsz)
        profile.set_shape(inp.name, (1, 3, plan.imgsz, plan.imgsz), shape, shape)
        config.add_optimization_profile(profile)

    if major < 11:  # weakly typed: precision is enabled by builder flags (all removed in TensorRT 11)
        if plan.precision in ("fp16", "int8") and plan.mode != "typed":
            config.set_flag(trt.BuilderFlag.FP16)  # INT8 engines: layers outside Q/DQ pairs may still use FP16
        if plan.precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
    if plan.mode == "implicit-int8":
        config.int8_calibrator = _entropy_calibrator(trt, plan)
        if profile is not None:
            config.set_calibration_profile(profile)
    if plan.dla_core is not None:
        if builder.num_DLA_cores == 0:
            raise UserError("this device has no DLA cores; drop --dla-core (DLA exists on Jetson Xavier/Orin)")
        if plan.dla_core >= builder.num_DLA_cores:
            raise UserError(f"DLA core {plan.dla_core} does not exist; this device has {builder.num_DLA_cores}")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = plan.dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)  # layers DLA cannot run go to the GPU instead of failing

    timing = None
    if plan.timing_cache is not None:
        data = plan.timing_cache.read_bytes() if plan.timing_cache.is_file() else b""
        timing = config.create_timing_cache(data)
        config.set_timing_cache(timing, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(f"TensorRT {trt.__version__} failed to build {plan.onnx.path.name} "
                        f"({plan.mode}); see the TensorRT log above")
    plan.engine_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = plan.engine_path.with_name(plan.engine_path.name + ".tmp")
    tmp.write_bytes(bytes(serialized))
    tmp.replace(plan.engine_path)
    if timing is not None:
        plan.timing_cache.parent.mkdir(parents=True, exist_ok=True)
        plan.timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    write_engine_metadata(plan.engine_path, engine_metadata(plan, trt.__version__, extra_metadata))
    return plan.engine_path


def _entropy_calibrator(trt: Any, plan: BuildPlan) -> Any:
    """An ``IInt8EntropyCalibrator2`` feeding letterboxed batches from CUDA memory owned by torch (no pycuda)."""
    import torch

    if not torch.cuda.is_available():
        raise UserError("INT8 calibration needs a CUDA build of torch on the GPU machine (torch.cuda is unavailable)")
    cache_path = plan.calibration_cache
    cache_bytes = cache_path.read_bytes() if cache_path and cache_path.is_file() else None
    batches = calibration_batches(plan.calibration_images, plan.imgsz, plan.batch) if cache_bytes is None else iter(())
    if cache_bytes is None and len(plan.calibration_images) < plan.batch:
        raise UserError(f"{len(plan.calibration_images)} calibration images are fewer than the batch {plan.batch}")

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.device_batch: torch.Tensor | None = None  # kept alive until TensorRT asks for the next batch

        def get_batch_size(self) -> int:
            return plan.batch

        def get_batch(self, names: list[str]) -> list[int] | None:
            batch = next(batches, None)
            if batch is None:
                return None
            self.device_batch = torch.from_numpy(np.ascontiguousarray(batch)).cuda()
            return [int(self.device_batch.data_ptr())]

        def read_calibration_cache(self) -> bytes | None:
            return cache_bytes

        def write_calibration_cache(self, cache: Any) -> None:
            if cache_path is not None and cache_bytes is None:  # a cache the user gave is never rewritten
                CalibrationCache.from_bytes(bytes(cache), source="TensorRT's cache")  # sanity: the format we document
                cache_path.parent.mkdir(parents=True, exist_ok=True)
                cache_path.write_bytes(bytes(cache))

    return EntropyCalibrator()


# --------------------------------------------------------------------------------------------------- CLI entry
def export_engine(
    model: str | Path,
    out: str | Path,
    precision: str = "auto",
    calibration_data: str | Path | Sequence[str | Path] | None = None,
    imgsz: int | None = None,
    batch: int = 1,
    dla_core: int | None = None,
    workspace_gb: float = 4,
    calibration_cache: str | Path | None = None,
    calibration_count: int = 500,
    timing_cache: str | Path | None = None,
    trt_version: str | None = None,
    overwrite: bool = False,
) -> dict:
    """``yolocomp export --format engine``: validate everything, then build; return a summary dict.

    ``model`` is an ONNX file (float or Q/DQ); ``out`` is the ``.engine`` path or a folder (``<onnx stem>.engine``
    inside it). ``calibration_data`` is a folder of images, a data yaml (train split) or a list of images, capped at
    ``calibration_count``. ``trt_version`` defaults to the installed TensorRT's; it only selects the version rules.
    All checks run before TensorRT is imported.
    """
    model = Path(model)
    if model.suffix.lower() != ".onnx":
        raise UserError(f"{model} is not an ONNX file; export it first (yolocomp export --format onnx, or "
                        "yolocomp ptq / qat for an INT8 Q/DQ ONNX) and build the engine from that")
    out = Path(out)
    engine_path = out if out.suffix in {".engine", ".plan"} else out / f"{model.stem}.engine"
    trt_version = trt_version or installed_tensorrt_version()
    info = inspect_onnx(model)
    needs_calibration = precision == "int8" and not info.qdq
    if calibration_data is not None and not needs_calibration:
        raise UserError("calibration data is only used for INT8 from a float ONNX; drop --calibration-data "
                        "(a Q/DQ ONNX already holds its scales)")
    images: list[Path] = []
    if needs_calibration and calibration_data is not None:
        images = find_calibration_images(calibration_data, calibration_count)
    plan = plan_build(model, engine_path, precision, images, calibration_cache, imgsz, batch, dla_core, workspace_gb,
                      timing_cache, trt_version=trt_version, overwrite=overwrite)
    if trt_version is None:
        raise UserError(INSTALL_HINT)
    trt = import_tensorrt()
    if trt.__version__ != trt_version:  # the rules were checked for another version: check again for this one
        plan = plan_build(model, engine_path, precision, images, calibration_cache, imgsz, batch, dla_core,
                          workspace_gb, timing_cache, trt_version=trt.__version__, overwrite=overwrite)
    engine = _build(trt, plan, None)
    summary = {k: v for k, v in asdict(plan).items() if k not in {"onnx", "calibration_images"}}
    summary.update(engine=str(engine), metadata=str(metadata_path(engine)), onnx=str(model),
                   calibration_images=len(plan.calibration_images), tensorrt=trt.__version__)
    return {k: str(v) if isinstance(v, Path) else v for k, v in summary.items()}


# --------------------------------------------------------------------------------------------------- runtime
def cuda_index(device: int | str | None) -> int:
    """GPU index from 0, "0", "cuda" or "cuda:1"; UserError for a CPU or unknown device."""
    text = str(0 if device is None else device).strip().lower()
    if text in {"cuda", "gpu"}:
        return 0
    text = text.removeprefix("cuda:")
    if not text.isdigit():
        raise UserError(f"TensorRT engines run on an NVIDIA GPU: device must be 0, 'cuda' or 'cuda:N', not {device!r}")
    return int(text)


class TensorRTRunner:
    """Run a serialized engine: ``runner(x)`` with x (N, 3, H, W) float32 returns (N, 4+nc, A) float32.

    Uses the TensorRT >= 8.5 named-tensor API (``set_tensor_address`` + ``execute_async_v3``) and falls back to
    bindings (``execute_async_v2``) on older versions. Device memory comes from torch CUDA tensors.
    Batches larger than the engine's maximum batch are run in chunks.
    """

    backend = "tensorrt"

    def __init__(self, engine_path: str | Path, device: int | str = 0):
        index = cuda_index(device)
        trt = import_tensorrt()
        import torch

        if not torch.cuda.is_available():
            raise UserError("running a TensorRT engine needs a CUDA build of torch and an NVIDIA GPU")
        self.trt, self.torch = trt, torch
        self.path = Path(engine_path)
        if not self.path.is_file():
            raise UserError(f"engine not found: {self.path}")
        self.metadata = read_engine_metadata(self.path) if metadata_path(self.path).is_file() else {}
        self.names: dict[int, str] = self.metadata.get("names", {})
        self.device = torch.device(f"cuda:{index}")
        torch.cuda.set_device(self.device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        if self.metadata.get("dla_core") is not None:
            self.runtime.DLA_core = int(self.metadata["dla_core"])
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            built = self.metadata.get("tensorrt", "another version")
            raise UserError(f"TensorRT {trt.__version__} cannot load {self.path.name} (built with TensorRT {built} or "
                            "for another GPU); engines are tied to both: rebuild it on this machine")
        self.context = self.engine.create_execution_context()
        self.tensor_api = hasattr(self.engine, "num_io_tensors") and hasattr(self.context, "execute_async_v3")
        self.input_name, self.output_name, in_shape = self._io()
        self.max_batch = in_shape[0] if in_shape[0] > 0 else self._profile_max_batch()
        self.imgsz = tuple(self.metadata.get("imgsz") or in_shape[2:])
        # the attributes yolocomp.eval's runners share
        self.source = str(self.path)
        self.fixed_batch = in_shape[0] if in_shape[0] > 0 else None
        self.fixed_imgsz = int(self.imgsz[0])
        self.nc = len(self.names) or int(self._output_shape()[1]) - 4

    def _output_shape(self) -> tuple[int, ...]:
        if self.tensor_api:
            return tuple(self.engine.get_tensor_shape(self.output_name))
        return tuple(self.engine.get_binding_shape(self.output_name))

    def synchronize(self) -> None:
        """Calls already wait for their stream; kept for the runner interface."""

    # -- introspection differs between the tensor API and the old bindings
    def _io(self) -> tuple[str, str, tuple[int, ...]]:
        trt, engine = self.trt, self.engine
        if self.tensor_api:
            names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
            inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
            outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
            shape = tuple(engine.get_tensor_shape(inputs[0]))
        else:
            names = [engine.get_binding_name(i) for i in range(engine.num_bindings)]
            inputs = [n for i, n in enumerate(names) if engine.binding_is_input(i)]
            outputs = [n for i, n in enumerate(names) if not engine.binding_is_input(i)]
            shape = tuple(engine.get_binding_shape(inputs[0]))
        if len(inputs) != 1 or not outputs:
            raise UserError(f"{self.path.name} has inputs {inputs} and outputs {outputs}; expected one image input")
        output = "output0" if "output0" in outputs else outputs[0]
        return inputs[0], output, shape

    def _profile_max_batch(self) -> int:
        if self.tensor_api:
            return int(self.engine.get_tensor_profile_shape(self.input_name, 0)[2][0])
        return int(self.engine.get_profile_shape(0, self.input_name)[2][0])

    def _dtype(self, name: str) -> Any:
        trt = self.trt
        dt = self.engine.get_tensor_dtype(name) if self.tensor_api else self.engine.get_binding_dtype(name)
        return self.torch.from_numpy(np.empty(0, dtype=trt.nptype(dt))).dtype

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        chunks = []
        for i in range(0, len(x), self.max_batch):
            chunk = x[i : i + self.max_batch]
            n = len(chunk)
            if self.fixed_batch and n < self.fixed_batch:  # a static-batch engine takes only full batches: zero-pad
                chunk = np.concatenate([chunk, np.zeros((self.fixed_batch - n, *chunk.shape[1:]), np.float32)])
            chunks.append(self._run(chunk)[:n])
        return np.concatenate(chunks) if len(chunks) > 1 else chunks[0]

    def _run(self, x: np.ndarray) -> np.ndarray:
        torch = self.torch
        inp = torch.from_numpy(np.ascontiguousarray(x)).to(self.device, dtype=self._dtype(self.input_name))
        stream = torch.cuda.current_stream(self.device)
        if self.tensor_api:
            self.context.set_input_shape(self.input_name, tuple(inp.shape))
            out = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)),
                              dtype=self._dtype(self.output_name), device=self.device)
            self.context.set_tensor_address(self.input_name, int(inp.data_ptr()))
            self.context.set_tensor_address(self.output_name, int(out.data_ptr()))
            for i in range(self.engine.num_io_tensors):  # other outputs still need a buffer
                name = self.engine.get_tensor_name(i)
                if name not in (self.input_name, self.output_name):
                    extra = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self._dtype(name),
                                        device=self.device)
                    self.context.set_tensor_address(name, int(extra.data_ptr()))
                    setattr(self, f"_keep_{i}", extra)
            ok = self.context.execute_async_v3(stream.cuda_stream)
        else:
            idx_in = self.engine.get_binding_index(self.input_name)
            self.context.set_binding_shape(idx_in, tuple(inp.shape))
            buffers = []
            for i in range(self.engine.num_bindings):
                if i == idx_in:
                    buffers.append(inp)
                    continue
                buffers.append(torch.empty(tuple(self.context.get_binding_shape(i)), device=self.device,
                                           dtype=self._dtype(self.engine.get_binding_name(i))))
            out = buffers[self.engine.get_binding_index(self.output_name)]
            ok = self.context.execute_async_v2([int(b.data_ptr()) for b in buffers], stream.cuda_stream)
        stream.synchronize()
        if not ok:
            raise RuntimeError(f"TensorRT execution of {self.path.name} failed (see the TensorRT log)")
        return out.float().cpu().numpy()
