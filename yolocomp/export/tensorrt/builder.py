"""Building engines: the TensorRT builder per version, and :func:`export_engine`, the CLI's entry.

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

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from yolocomp.errors import UserError
from yolocomp.export.calibration import find_calibration_images
from yolocomp.export.tensorrt import rules
from yolocomp.export.tensorrt.calibrator import entropy_calibrator
from yolocomp.export.tensorrt.metadata import engine_metadata, metadata_path, write_engine_metadata
from yolocomp.export.tensorrt.onnx_info import inspect_onnx
from yolocomp.export.tensorrt.rules import INSTALL_HINT, BuildPlan, import_tensorrt, major_version, plan_build


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
    major = major_version(trt.__version__)
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
        config.int8_calibrator = entropy_calibrator(trt, plan)
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
    trt_version = trt_version or rules.installed_tensorrt_version()  # via the module: replaceable
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


