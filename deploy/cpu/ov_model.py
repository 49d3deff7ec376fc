"""An OpenVINO detector (an IR folder as `yolocomp export --format openvino` or Ultralytics write it, its .xml, or an
.onnx read by OpenVINO directly) with the interface deploy/common/app.py expects."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # deploy/ for `common`, without installing anything

from common.detect import parse_names  # noqa: E402

OPENVINO_MISSING = "OpenVINO is required for --runtime openvino: pip install openvino"


def ir_xml(path: Path) -> Path:
    if path.suffix.lower() in {".xml", ".onnx"}:
        if not path.is_file():
            raise SystemExit(f"model not found: {path}")
        return path
    xmls = sorted(path.glob("*.xml")) if path.is_dir() else []
    if len(xmls) != 1:
        raise SystemExit(f"no OpenVINO model at {path}: give an *_openvino_model folder (one .xml), an .xml or an .onnx")
    return xmls[0]


def read_names_and_size(xml: Path, model) -> tuple[dict[int, str], object]:  # noqa: ANN001 - an openvino.Model
    """Class names and image size: metadata.yaml (PyYAML when installed), else the IR's model_info, else ONNX
    metadata for an .onnx (onnx when installed)."""
    sidecar = xml.parent / "metadata.yaml"
    if xml.suffix.lower() == ".xml" and sidecar.is_file():
        try:
            import yaml

            meta = yaml.safe_load(sidecar.read_text()) or {}
            return parse_names(meta.get("names") or {}), meta.get("imgsz")
        except ImportError:
            pass
    if model.has_rt_info(["model_info", "names"]):
        imgsz = model.get_rt_info(["model_info", "imgsz"]).astype(str) if model.has_rt_info(["model_info", "imgsz"]) else None
        return parse_names(model.get_rt_info(["model_info", "names"]).astype(str)), imgsz
    if model.has_rt_info(["model_info", "labels"]):  # an Ultralytics IR without PyYAML: labels lose their spaces
        labels = model.get_rt_info(["model_info", "labels"]).astype(str)
        return parse_names(labels.split() if isinstance(labels, str) else list(labels)), None
    if xml.suffix.lower() == ".onnx":
        try:
            import onnx

            meta = {p.key: p.value for p in onnx.load(str(xml), load_external_data=False).metadata_props}
            return parse_names(meta.get("names", "{}")), meta.get("imgsz")
        except ImportError:
            pass
    return {}, None


class OvModel:
    backend = "openvino"

    def __init__(self, path: str | Path, threads: int | None = None, imgsz: int | None = None,
                 float_precision: str = "f32"):
        try:
            import openvino as ov
        except ImportError as e:
            raise SystemExit(OPENVINO_MISSING) from e
        self.path = Path(path)
        xml = ir_xml(self.path)
        core = ov.Core()
        try:
            model = core.read_model(str(xml))
        except Exception as e:  # OpenVINO raises RuntimeError subclasses with multi-line messages
            reason = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            raise SystemExit(f"cannot load {path} with OpenVINO: {reason.strip()[:200]} (re-export the model)") from e
        self.names, meta_size = read_names_and_size(xml, model)
        shape = model.input(0).get_partial_shape()
        dims = [d.get_length() if d.is_static else None for d in shape]
        h, w = dims[2], dims[3]
        if h is None or w is None:  # dynamic spatial axes: metadata or --imgsz decides
            size = imgsz or _size(meta_size)
            if not size:
                raise SystemExit(f"{path} has a dynamic input size; pass --imgsz")
            h, w = (size, size) if isinstance(size, int) else size
            model.reshape([dims[0] if dims[0] else -1, 3, int(h), int(w)])
        self.imgsz = (int(h), int(w))
        self.batch = dims[0]
        # f32 for float layers, as yolocomp eval runs them (CPUs with AVX512-BF16/AMX would otherwise pick bf16)
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": float_precision}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.output = self.compiled.output(0)
        self.precision = _precision(model)
        self.params = None
        self.device = "cpu"
        self.files = [xml, xml.with_suffix(".bin")] if xml.suffix.lower() == ".xml" else [xml]
        if not self.names:  # no metadata: number the classes from the output width
            out = self.compiled.output(0).get_partial_shape()
            nc = out[1].get_length() if out.rank.get_length() == 3 and out[1].is_static else None
            self.names = {i: str(i) for i in range(nc - 4)} if nc else {}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        result = self.request.infer({0: np.ascontiguousarray(x, dtype=np.float32)})
        return np.array(result[self.output], dtype=np.float32, copy=True)


def _size(value: object) -> int | tuple[int, int] | None:
    import ast

    if isinstance(value, str):
        value = ast.literal_eval(value)
    if isinstance(value, list | tuple):
        return tuple(int(v) for v in value)
    return int(value) if value else None


def _precision(model) -> str:  # noqa: ANN001 - an openvino.Model
    """``int8`` for FakeQuantize (from Q/DQ or NNCF), ``fp16`` for compressed weights, else ``fp32``."""
    types = {op.get_type_name() for op in model.get_ops()}
    if "FakeQuantize" in types:
        return "int8"
    if any(op.get_type_name() == "Constant" and op.get_element_type().get_type_name() == "f16" for op in model.get_ops()):
        return "fp16"
    return "fp32"
