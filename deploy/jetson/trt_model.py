"""A TensorRT engine runner for Jetson / any NVIDIA GPU, with the interface deploy/common/app.py expects.

Needs the ``tensorrt`` Python bindings (JetPack: python3-libnvinfer) and, for device memory, either torch with CUDA
or cuda-python (``pip install cuda-python``). Uses the named-tensor API (TensorRT >= 8.5: ``set_tensor_address`` +
``execute_async_v3``) and falls back to bindings (``execute_async_v2``) before that. Independent of the yolocomp package on
purpose: a Jetson needs only numpy, OpenCV and this folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise SystemExit("TensorRT Python bindings not found: on JetPack `sudo apt install python3-libnvinfer`, "
                         "elsewhere `pip install tensorrt`") from e
    return trt


class _TorchMemory:
    """Device buffers as torch CUDA tensors."""

    def __init__(self):
        import torch

        if not torch.cuda.is_available():
            raise ImportError("torch has no CUDA")
        self.torch = torch
        self.stream = torch.cuda.Stream()
        self.handle = self.stream.cuda_stream

    def empty(self, shape: tuple[int, ...], dtype: np.dtype):
        return self.torch.empty(shape, dtype=self.torch.from_numpy(np.empty(0, dtype)).dtype, device="cuda")

    def ptr(self, buf) -> int:  # noqa: ANN001
        return int(buf.data_ptr())

    def h2d(self, buf, arr: np.ndarray) -> None:  # noqa: ANN001
        with self.torch.cuda.stream(self.stream):  # same stream as the inference: ordered, no extra sync
            buf.copy_(self.torch.from_numpy(arr))

    def d2h(self, buf) -> np.ndarray:  # noqa: ANN001
        self.stream.synchronize()
        return buf.cpu().numpy()

    def sync(self) -> None:
        self.stream.synchronize()


class _CudaPythonMemory:
    """Device buffers from cuda-python's runtime bindings (cudaMalloc / cudaMemcpy)."""

    def __init__(self):
        try:
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
        except ImportError:
            from cuda import cudart  # older cuda-python
        self.cudart = cudart
        err, self.stream = cudart.cudaStreamCreate()
        self._check(err)
        self.handle = int(self.stream)  # TensorRT takes the raw cudaStream_t as an integer

    def _check(self, err) -> None:  # noqa: ANN001
        if int(err) != 0:
            raise RuntimeError(f"CUDA error {err}")

    def empty(self, shape: tuple[int, ...], dtype: np.dtype):
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        err, ptr = self.cudart.cudaMalloc(nbytes)
        self._check(err)
        return (ptr, shape, np.dtype(dtype))

    def ptr(self, buf) -> int:  # noqa: ANN001
        return int(buf[0])

    def h2d(self, buf, arr: np.ndarray) -> None:  # noqa: ANN001
        arr = np.ascontiguousarray(arr, dtype=buf[2])
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        (err,) = self.cudart.cudaMemcpyAsync(buf[0], arr.ctypes.data, arr.nbytes, kind, self.stream)
        self._check(err)
        self._hold = arr  # the host array must live until the copy ran

    def d2h(self, buf) -> np.ndarray:  # noqa: ANN001
        out = np.empty(buf[1], dtype=buf[2])
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        (err,) = self.cudart.cudaMemcpyAsync(out.ctypes.data, buf[0], out.nbytes, kind, self.stream)
        self._check(err)
        self.sync()
        return out

    def sync(self) -> None:
        (err,) = self.cudart.cudaStreamSynchronize(self.stream)
        self._check(err)


def _memory():
    for cls in (_TorchMemory, _CudaPythonMemory):
        try:
            return cls()
        except ImportError:
            continue
    raise SystemExit("no CUDA memory backend: install torch with CUDA (NVIDIA's Jetson wheel) or `pip install cuda-python`")


class TrtModel:
    backend = "tensorrt"

    def __init__(self, path: str | Path, dla_core: int | None = None):
        trt = _tensorrt()
        self.trt, self.path = trt, Path(path)
        if not self.path.is_file():
            raise SystemExit(f"engine not found: {path}")
        meta_file = self.path.with_name(self.path.name + ".json")
        self.meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        dla = dla_core if dla_core is not None else self.meta.get("dla_core")
        if dla is not None:
            self.runtime.DLA_core = int(dla)
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise SystemExit(f"TensorRT {trt.__version__} cannot load {path}: engines only load on the TensorRT "
                             f"version and GPU they were built with (built with {self.meta.get('tensorrt', '?')}); rebuild it")
        self.context = self.engine.create_execution_context()
        self.mem = _memory()
        self.tensor_api = hasattr(self.engine, "num_io_tensors") and hasattr(self.context, "execute_async_v3")
        self._find_io()
        self.names = {int(k): v for k, v in (self.meta.get("names") or {}).items()}
        self.precision = self.meta.get("precision", "unknown")
        self.params, self.gflops = self.meta.get("params"), self.meta.get("gflops")
        self.device = f"cuda:0{' dla' + str(dla) if dla is not None else ''}"
        self._buffers: dict[tuple, dict] = {}

    def _find_io(self) -> None:
        trt, e = self.trt, self.engine
        if self.tensor_api:
            names = [e.get_tensor_name(i) for i in range(e.num_io_tensors)]
            is_input = {n: e.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
            shape_of, dtype_of = e.get_tensor_shape, e.get_tensor_dtype
        else:
            names = [e.get_binding_name(i) for i in range(e.num_bindings)]
            is_input = {n: e.binding_is_input(i) for i, n in enumerate(names)}
            shape_of, dtype_of = e.get_binding_shape, e.get_binding_dtype
        self.io_names = names
        self.input_name = next(n for n in names if is_input[n])
        outputs = [n for n in names if not is_input[n]]
        self.output_name = "output0" if "output0" in outputs else outputs[0]
        self.dtypes = {n: np.dtype(trt.nptype(dtype_of(n))) for n in names}
        shape = tuple(shape_of(self.input_name))
        self.batch = shape[0] if shape[0] > 0 else None
        self.imgsz = tuple(self.meta.get("imgsz") or shape[2:])
        if not all(isinstance(s, int) and s > 0 for s in self.imgsz):
            raise SystemExit(f"{self.path} has a dynamic image size and no {self.path.name}.json with imgsz")

    def _shape(self, name: str) -> tuple[int, ...]:
        if self.tensor_api:
            return tuple(self.context.get_tensor_shape(name))
        return tuple(self.context.get_binding_shape(self.engine.get_binding_index(name)))

    def _bind(self, shape: tuple[int, ...]) -> dict:
        """Buffers for one input shape, allocated once and reused (allocation is not part of the timed call)."""
        if shape in self._buffers:
            return self._buffers[shape]
        if self.tensor_api:
            self.context.set_input_shape(self.input_name, shape)
        else:
            self.context.set_binding_shape(self.engine.get_binding_index(self.input_name), shape)
        bufs = {n: self.mem.empty(shape if n == self.input_name else self._shape(n), self.dtypes[n]) for n in self.io_names}
        self._buffers[shape] = bufs
        return bufs

    def __call__(self, x: np.ndarray) -> np.ndarray:
        shape = tuple(x.shape)
        bufs = self._bind(shape)
        if self.tensor_api:
            self.context.set_input_shape(self.input_name, shape)
            for n in self.io_names:
                self.context.set_tensor_address(n, self.mem.ptr(bufs[n]))
        self.mem.h2d(bufs[self.input_name], np.ascontiguousarray(x, dtype=self.dtypes[self.input_name]))
        if self.tensor_api:
            ok = self.context.execute_async_v3(self.mem.handle)
        else:
            ok = self.context.execute_async_v2([self.mem.ptr(bufs[n]) for n in self.io_names], self.mem.handle)
        if not ok:
            raise RuntimeError(f"TensorRT execution of {self.path} failed")
        return self.mem.d2h(bufs[self.output_name]).astype(np.float32)
