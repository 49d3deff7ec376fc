"""An ONNX Runtime detector (FP32 or INT8 Q/DQ ONNX) with the interface deploy/common/app.py expects."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # deploy/ for `common`, without installing anything

from common.benchmark import onnx_param_count  # noqa: E402
from common.detect import parse_names  # noqa: E402


def onnx_precision(path: str | Path) -> str:
    """``int8`` for a Q/DQ graph, ``fp16`` for a half-precision input, else ``fp32`` (``unknown`` without onnx)."""
    try:
        import onnx
    except ImportError:
        return "unknown"
    model = onnx.load(str(path), load_external_data=False)
    if any(n.op_type in {"QuantizeLinear", "DequantizeLinear", "QLinearConv"} for n in model.graph.node):
        return "int8"
    if model.graph.input and model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16:
        return "fp16"
    return "fp32"


class OrtModel:
    backend = "onnxruntime"

    def __init__(self, path: str | Path, threads: int | None = None, imgsz: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise SystemExit("onnxruntime is required: pip install onnxruntime") from e
        self.path = Path(path)
        if not self.path.is_file():
            raise SystemExit(f"model not found: {path}")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types for corrupt / unsupported graphs
            reason = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            raise SystemExit(f"cannot load {path} with ONNX Runtime: {reason.strip()[:200]} (re-export the model)") from e
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_dtype = np.float16 if "float16" in inp.type else np.float32
        meta = self.session.get_modelmeta().custom_metadata_map
        self.names = parse_names(meta.get("names", "{}"))
        h, w = inp.shape[2], inp.shape[3]
        if not isinstance(h, int) or not isinstance(w, int):  # dynamic spatial axes: metadata or --imgsz decides
            size = imgsz or eval_imgsz(meta.get("imgsz"))
            if not size:
                raise SystemExit(f"{path} has a dynamic input size; pass --imgsz")
            h, w = (size, size) if isinstance(size, int) else size
        self.imgsz = (int(h), int(w))
        self.batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        self.precision = onnx_precision(self.path)
        self.params = onnx_param_count(self.path)
        self.device = "cpu"
        if not self.names:  # an ONNX without Ultralytics metadata: number the classes from the output width
            nc = self.session.get_outputs()[0].shape[1]
            self.names = {i: str(i) for i in range(nc - 4)} if isinstance(nc, int) else {}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x.astype(self.input_dtype, copy=False)})[0].astype(np.float32)


def eval_imgsz(value: str | None) -> int | tuple[int, int] | None:
    import ast

    if not value:
        return None
    v = ast.literal_eval(value)
    return tuple(v) if isinstance(v, list | tuple) else int(v)
