"""OpenVINO IR export: a yolocomp ONNX (float, or Q/DQ from ``ptq`` / ``qat``) or a ``.pt`` to the folder layout
Ultralytics writes and ``ultralytics.YOLO(folder)`` loads: ``<stem>_openvino_model/<stem>.xml``, ``.bin`` and
``metadata.yaml`` (names, stride, imgsz, task, batch, ...).

Conversion is OpenVINO's own (``openvino.convert_model`` on the ONNX, ``openvino.save_model``). Q/DQ pairs become
FakeQuantize nodes, which the CPU plugin's low-precision transformations run as integer (u8/i8) convolutions, so
the same Q/DQ artifact serves TensorRT and OpenVINO. Float models are written as FP32 IR, or with
``precision="fp16"`` with FP16-compressed weights (the CPU plugin decompresses them on load).
"""

from __future__ import annotations

import ast
import shutil
import tempfile
from pathlib import Path
from typing import Any

from yolocomp.errors import UserError, first_line
from yolocomp.eval.runners.openvino import METADATA, OPENVINO_MISSING, import_openvino

PRECISIONS = ("auto", "fp32", "fp16", "int8")
SUFFIX = "_openvino_model"

__all__ = ["OPENVINO_MISSING", "PRECISIONS", "SUFFIX", "export_openvino", "has_qdq", "import_openvino", "ir_metadata"]


def has_qdq(onnx_path: str | Path) -> bool:
    """True when the ONNX graph holds QuantizeLinear / DequantizeLinear nodes (an INT8 model)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return any(n.op_type in {"QuantizeLinear", "DequantizeLinear", "QLinearConv"} for n in graph.node)


def _literal(value: Any, default: Any = None) -> Any:
    if not isinstance(value, str):
        return default if value is None else value
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def ir_metadata(onnx_path: str | Path, precision: str, input_shape: list[int | None], nc: int | None) -> dict:
    """Ultralytics' ``metadata.yaml`` content for an IR converted from ``onnx_path``: its ONNX metadata (yolocomp
    and Ultralytics write the same keys) with proper types, filled from the graph where the ONNX has none."""
    from yolocomp import __version__
    from yolocomp.export.onnx_metadata import read_metadata

    raw = read_metadata(onnx_path)
    names = _literal(raw.get("names"), {}) or {}
    if isinstance(names, (list, tuple)):
        names = dict(enumerate(names))
    if not names and nc:
        names = {i: str(i) for i in range(nc)}
    batch, size = input_shape[0], input_shape[2] if len(input_shape) == 4 else None
    imgsz = _literal(raw.get("imgsz"), None) or ([size, size] if size else [640, 640])
    if isinstance(imgsz, int):
        imgsz = [imgsz, imgsz]
    dynamic = bool(_literal(raw.get("dynamic"), batch is None)) or batch is None
    return {
        "description": raw.get("description", f"OpenVINO IR of {Path(onnx_path).name}") + f" (OpenVINO {precision} IR)",
        "author": raw.get("author", "yolocomp"),
        "date": raw.get("date"),
        "version": raw.get("version", __version__),
        "stride": int(_literal(raw.get("stride"), 32)),
        "task": raw.get("task", "detect"),
        "batch": int(_literal(raw.get("batch"), batch or 1)),
        "imgsz": [int(v) for v in imgsz],
        "names": {int(k): str(v) for k, v in names.items()},
        "channels": 3,
        "end2end": False,
        "args": {"batch": int(batch or 1), "dynamic": dynamic, "half": precision == "fp16", "int8": precision == "int8",
                 "nms": False},
        "precision": precision,
        "source": Path(onnx_path).name,
    }


def _resolve_precision(precision: str, qdq: bool, source: Path) -> str:
    if precision not in PRECISIONS:
        raise UserError(f"precision {precision!r} for OpenVINO: use one of {', '.join(PRECISIONS)}")
    if qdq:
        if precision in {"fp32", "fp16"}:
            raise UserError(f"{source.name} is a Q/DQ (INT8) model; OpenVINO runs it as INT8: use --precision auto "
                            "or int8, or export the float model for an FP32/FP16 IR")
        return "int8"
    if precision == "int8":
        raise UserError(f"{source.name} is a float model; an INT8 IR needs a Q/DQ ONNX: run yolocomp ptq (or qat) "
                        "first and export its model_int8.onnx")
    return "fp32" if precision == "auto" else precision


def low_bit_activation_nodes(onnx_path: Path) -> list[str]:
    """QuantizeLinear nodes of activations (not weights) with 4-bit (INT4 / UINT4) zero-points."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    four_bit = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
    return [n.name or n.output[0] for n in model.graph.node
            if n.op_type == "QuantizeLinear" and n.input[0] not in inits and len(n.input) > 2
            and n.input[2] in inits and inits[n.input[2]].data_type in four_bit]


def refuse_low_bit_activations(onnx_path: Path) -> None:
    """OpenVINO has no 4-bit activation kernels and its converter corrupts memory on INT4 activation Q/DQ (the
    process aborts), so such a file is refused before it reaches OpenVINO."""
    nodes = low_bit_activation_nodes(onnx_path)
    if nodes:
        raise UserError(f"{onnx_path.name} has {len(nodes)} 4-bit activation quantizers, which OpenVINO cannot run; "
                        f"deploy it with ONNX Runtime or TensorRT, or quantize activations to 8 bits (--act-bits 8)")


def export_openvino(model: Any, out_dir: str | Path, imgsz: int = 640, precision: str = "auto",
                    dynamic: bool = False, stem: str | None = None, info: dict | None = None) -> Path:
    """Convert ``model`` to an OpenVINO IR folder ``out_dir/<stem>_openvino_model/`` and return the folder.

    ``model``: an ``.onnx`` (float, or Q/DQ as ``yolocomp ptq`` / ``qat`` write it: INT8 IR), a ``.pt`` or an
    in-memory DetectionModel (exported to ONNX first with yolocomp's exporter, at ``imgsz``, ``dynamic`` batch when
    asked). ``precision``: ``auto`` (INT8 for Q/DQ, else FP32), ``fp32``, ``fp16`` (FP16-compressed weights) or
    ``int8`` (Q/DQ models only). ``stem`` names the folder and files (default: the model file's stem). ``info``
    (a dict) receives what was done: precision, source ONNX, executed convolutions by runtime precision (compiled
    as yolocomp's runner compiles it: float layers in f32).
    A missing OpenVINO raises the install hint before anything is written.
    """
    ov = import_openvino()
    out_dir = Path(out_dir)
    info = {} if info is None else info
    with tempfile.TemporaryDirectory(prefix="yolocomp-openvino-") as scratch:
        onnx_path, default_stem = _as_onnx(model, Path(scratch), imgsz, dynamic)
        stem = stem or default_stem
        refuse_low_bit_activations(onnx_path)
        resolved = _resolve_precision(precision, has_qdq(onnx_path), onnx_path)
        try:
            ov_model = ov.convert_model(str(onnx_path))
        except Exception as e:  # OpenVINO's frontends raise their own error types
            raise UserError(f"OpenVINO cannot convert {onnx_path.name}: {first_line(e)}") from e
        shape = [d.get_length() if d.is_static else None for d in ov_model.input(0).get_partial_shape()]
        out_shape = ov_model.output(0).get_partial_shape()
        nc = out_shape[1].get_length() - 4 if out_shape.rank.get_length() == 3 and out_shape[1].is_static else None
        meta = ir_metadata(onnx_path, resolved, shape, nc)
        _set_rt_info(ov_model, meta)
        folder = out_dir / f"{stem}{SUFFIX}"
        staging = out_dir / f".{stem}{SUFFIX}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            staging.mkdir(parents=True)
            ov.save_model(ov_model, str(staging / f"{stem}.xml"), compress_to_fp16=resolved == "fp16")
            _write_yaml(staging / METADATA, meta)
            if folder.exists():
                shutil.rmtree(folder)
            staging.rename(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    compiled = ov.Core().compile_model(str(folder / f"{stem}.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    from yolocomp.eval.runners.openvino import precision_summary

    info.update(folder=str(folder), xml=str(folder / f"{stem}.xml"), precision=resolved, openvino=ov.__version__,
                source=str(model) if isinstance(model, (str, Path)) else "<in-memory>",
                conv_precisions=precision_summary(compiled))
    return folder


def _as_onnx(model: Any, scratch: Path, imgsz: int, dynamic: bool) -> tuple[Path, str]:
    """The ONNX to convert and the default stem: an ``.onnx`` as given, anything else through yolocomp's exporter."""
    if isinstance(model, (str, Path)) and str(model).lower().endswith(".onnx"):
        path = Path(model)
        if not path.is_file():
            raise UserError(f"model file not found: {path} (check the path)")
        return path, path.stem
    from yolocomp.export.onnx_qdq import export_onnx
    from yolocomp.integration import load_model

    stem = Path(model).stem if isinstance(model, (str, Path)) else "model"
    net = load_model(model)
    return Path(export_onnx(net, scratch / f"{stem}.onnx", imgsz=imgsz, dynamic=dynamic)), stem


def _set_rt_info(ov_model: Any, meta: dict) -> None:
    """The model_info Ultralytics writes into its IR (read by OpenVINO's model API and deploy/cpu without YAML)."""
    ov_model.set_rt_info("YOLO", ["model_info", "model_type"])
    ov_model.set_rt_info(True, ["model_info", "reverse_input_channels"])
    ov_model.set_rt_info(114, ["model_info", "pad_value"])
    ov_model.set_rt_info([255.0], ["model_info", "scale_values"])
    ov_model.set_rt_info(0.7, ["model_info", "iou_threshold"])
    ov_model.set_rt_info([v.replace(" ", "_") for v in meta["names"].values()], ["model_info", "labels"])
    ov_model.set_rt_info("fit_to_window_letterbox", ["model_info", "resize_type"])
    ov_model.set_rt_info(str(meta["names"]), ["model_info", "names"])  # exact names (labels lose their spaces)
    ov_model.set_rt_info(str(meta["imgsz"]), ["model_info", "imgsz"])


def _write_yaml(path: Path, meta: dict) -> None:
    import yaml

    path.write_text(yaml.safe_dump(meta, sort_keys=False, allow_unicode=True))
