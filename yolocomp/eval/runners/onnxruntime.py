"""ONNX Runtime runner: FP32 or Q/DQ INT8 graphs alike, dynamic or fixed batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from yolocomp.errors import UserError, first_line
from yolocomp.eval.runners.base import run_in_chunks


class OnnxRunner:
    """An ONNX model in ONNX Runtime."""

    backend = "onnxruntime"

    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None):
        import onnxruntime as ort

        self.source = str(path)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # ORT warns about unused initializers in Q/DQ graphs; not the user's concern
        if threads:
            options.intra_op_num_threads = int(threads)
        # ORT's worker threads spin after each run by default; interleaved with PyTorch models (bench --compare, the
        # run report) that spinning steals the cores from the next model and inflates its latency many times over.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        want_cuda = str(device).lower().startswith("cuda") or str(device).isdigit()
        providers = ["CPUExecutionProvider"]
        if want_cuda and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # ORT raises its own Fail/InvalidGraph types
            raise UserError(f"ONNX Runtime cannot load {path}: {first_line(e)} (re-export the model)") from e
        self.providers = self.session.get_providers()
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        shape = inp.shape
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None
        self.fixed_imgsz = shape[2] if len(shape) == 4 and isinstance(shape[2], int) else None
        out_shape = self.session.get_outputs()[0].shape
        # (N, 4 + nc, A); an end-to-end head (YOLOv10 / YOLO26) outputs (N, max_det, 6) and names no class count
        end2end = len(out_shape) == 3 and out_shape[-1] == 6
        self.nc = out_shape[1] - 4 if len(out_shape) == 3 and isinstance(out_shape[1], int) and not end2end else 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.fixed_batch is None:
            return self._run(np.ascontiguousarray(x, dtype=np.float32))
        # A fixed-batch export (Ultralytics' default is batch 1) runs in chunks, the last one zero-padded.
        return run_in_chunks(self._run, x, self.fixed_batch, pad=True)

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]

    def synchronize(self) -> None:
        """ORT's run() returns host arrays, so it is already synchronous."""
