"""TensorRT runner: a serialized engine on an NVIDIA GPU, TensorRT 8.x through 11."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from yolocomp.errors import UserError
from yolocomp.eval.runners.base import run_in_chunks
from yolocomp.eval.runners.engine_metadata import metadata_path, read_engine_metadata

TENSORRT_MISSING = "TensorRT is not installed: pip install 'yolocomp[tensorrt]' on a machine with an NVIDIA GPU"


def import_tensorrt() -> Any:
    """The ``tensorrt`` module, or a UserError saying how to install it."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:  # OSError: the wheel is there but libnvinfer cannot be loaded
        raise UserError(TENSORRT_MISSING) from e
    return trt


def cuda_index(device: int | str | None) -> int:
    """GPU index from 0, "0", "cuda" or "cuda:1"; UserError for a CPU or unknown device."""
    text = str(0 if device is None else device).strip().lower()
    if text in {"cuda", "gpu"}:
        return 0
    text = text.removeprefix("cuda:")
    if not text.isdigit():
        raise UserError(f"TensorRT engines run on an NVIDIA GPU: device must be 0, 'cuda' or 'cuda:N', not {device!r}")
    return int(text)


def tensorrt_runner(path: str | Path, device: str | int = "cuda") -> TensorRTRunner:
    """The runner ``make_runner`` returns for an ``.engine``; a clear error where TensorRT is absent."""
    import_tensorrt()
    if str(device).lower() == "cpu":  # an engine runs only on its GPU; "cpu" is just the CLI default
        device = 0
    return TensorRTRunner(path, device=device)


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
        # the attributes of the Runner protocol
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
        # a static-batch engine takes only full batches (pad); a dynamic one up to its profile's maximum
        return run_in_chunks(self._run, x, self.max_batch, pad=self.fixed_batch is not None)

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
