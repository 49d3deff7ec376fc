"""OpenVINO runner: an IR folder (``<stem>_openvino_model/`` with ``.xml``, ``.bin`` and ``metadata.yaml``, the layout
Ultralytics writes and loads), an ``.xml``, FP32 / FP16-compressed / INT8 alike, on the CPU.

The metadata reader lives here, beside the runtime, so evaluation reads an IR without importing the export package.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import numpy as np

from yolocomp.errors import UserError, first_line
from yolocomp.eval.runners.base import run_in_chunks

OPENVINO_MISSING = "OpenVINO is not installed: pip install 'yolocomp[openvino]'"
METADATA = "metadata.yaml"


def import_openvino() -> Any:
    """The ``openvino`` module, or a UserError saying how to install it."""
    try:
        import openvino as ov
    except (ImportError, OSError) as e:  # OSError: the wheel is there but its shared libraries cannot be loaded
        raise UserError(OPENVINO_MISSING) from e
    return ov


def openvino_version() -> str | None:
    """The installed OpenVINO version, or None (without importing the runtime when it is absent)."""
    from importlib import metadata

    try:
        return metadata.version("openvino")
    except metadata.PackageNotFoundError:
        return None


def is_openvino(path: str | Path) -> bool:
    """True for an ``.xml`` file or a folder holding one (an OpenVINO IR)."""
    path = Path(path)
    if path.suffix.lower() == ".xml":
        return True
    return path.is_dir() and any(path.glob("*.xml"))


def openvino_xml(path: str | Path) -> Path:
    """The ``.xml`` of an IR given as the file or its folder; UserError when there is none (or several)."""
    path = Path(path)
    if path.suffix.lower() == ".xml":
        if not path.is_file():
            raise UserError(f"model file not found: {path} (check the path)")
        return path
    if not path.is_dir():
        raise UserError(f"model not found: {path} (give an OpenVINO folder or its .xml)")
    xmls = sorted(path.glob("*.xml"))
    if len(xmls) != 1:
        what = "no .xml" if not xmls else f"{len(xmls)} .xml files"
        raise UserError(f"{path} holds {what}; give an OpenVINO folder with one IR (yolocomp export --format openvino)")
    return xmls[0]


def read_openvino_metadata(path: str | Path) -> dict:
    """``metadata.yaml`` of an IR (folder or ``.xml``) with Ultralytics' types (names as {int: str}, imgsz as a list);
    empty when there is none."""
    import yaml

    xml = openvino_xml(path)
    file = xml.parent / METADATA
    if not file.is_file():
        return {}
    try:
        meta = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{file} is not valid YAML ({first_line(e)}); re-export the model") from e
    for key in ("names", "imgsz", "args"):
        if isinstance(meta.get(key), str):
            meta[key] = ast.literal_eval(meta[key])
    names = meta.get("names") or {}
    if isinstance(names, (list, tuple)):
        names = dict(enumerate(names))
    meta["names"] = {int(k): str(v) for k, v in names.items()}
    return meta


def runtime_layers(compiled: Any) -> list[dict]:
    """What the CPU plugin actually runs: one ``{name, type, precision}`` per executed layer of a compiled model
    (``type`` is the plugin's layer type such as ``Convolution``; ``precision`` its runtime precision, e.g. ``u8``
    or ``i8`` for an integer convolution, ``f32`` for a float one)."""
    layers = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind, precision = (info[k].astype(str) if k in info else "" for k in ("layerType", "runtimePrecision"))
        layers.append({"name": op.get_friendly_name(), "type": kind, "precision": precision})
    return layers


def precision_summary(compiled: Any) -> dict[str, int]:
    """Executed convolutions by runtime precision, e.g. ``{"u8": 63, "f32": 1}``."""
    counts: dict[str, int] = {}
    for layer in runtime_layers(compiled):
        if layer["type"] == "Convolution":
            counts[layer["precision"]] = counts.get(layer["precision"], 0) + 1
    return counts


class OpenVINORunner:
    """An OpenVINO IR (or an ONNX file read by OpenVINO's ONNX frontend) compiled for the CPU in latency mode.

    ``threads`` sets ``INFERENCE_NUM_THREADS`` (None: the plugin's default, all physical cores). ``float_precision``
    is the CPU plugin's ``INFERENCE_PRECISION_HINT`` for the float parts of a model: ``"f32"`` by default, so an FP32
    IR computes what ONNX Runtime computes (on CPUs with AVX512-BF16 or AMX the plugin would otherwise run float
    layers in bf16, faster but not the same model); ``"bf16"`` or None (the plugin's choice) to trade accuracy for
    speed. INT8 layers run in integer either way.
    """

    backend = "openvino"

    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None,
                 float_precision: str | None = "f32"):
        ov = import_openvino()
        path = Path(path)
        if str(device).lower() not in {"cpu", "auto"}:  # "cpu" is the CLI default; a CUDA request cannot be honoured
            raise UserError(f"OpenVINO models run on the CPU here: use --device cpu, not {device!r}")
        self.xml = path if path.suffix.lower() == ".onnx" else openvino_xml(path)
        self.source = str(path)
        self.metadata = read_openvino_metadata(self.xml) if self.xml.suffix.lower() == ".xml" else {}
        self.names: dict[int, str] = self.metadata.get("names", {})
        core = ov.Core()
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        if float_precision:
            config["INFERENCE_PRECISION_HINT"] = float_precision
        try:
            model = core.read_model(str(self.xml))
            self.compiled = core.compile_model(model, "CPU", config)
        except Exception as e:  # OpenVINO raises RuntimeError subclasses with multi-line messages
            raise UserError(f"OpenVINO cannot load {path}: {first_line(e)} (re-export the model)") from e
        self.request = self.compiled.create_infer_request()
        self._output = self.compiled.output(0)
        self.threads = int(self.compiled.get_property("INFERENCE_NUM_THREADS"))  #: as compiled (0: the plugin's choice)
        self.providers = [f"OpenVINO {ov.__version__} CPU"]
        shape = self.compiled.input(0).get_partial_shape()
        dims = [d.get_length() if d.is_static else None for d in shape]
        self.fixed_batch = dims[0] if dims else None
        self.fixed_imgsz = dims[2] if len(dims) == 4 else None
        out = self.compiled.output(0).get_partial_shape()
        width = out[1].get_length() if out.rank.get_length() == 3 and out[1].is_static else None
        end2end = out.rank.get_length() == 3 and out[2].is_static and out[2].get_length() == 6
        self.nc = len(self.names) or (width - 4 if width and not end2end else 0)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.fixed_batch is None:
            return self._run(np.ascontiguousarray(x, dtype=np.float32))
        return run_in_chunks(self._run, x, self.fixed_batch, pad=True)

    def _run(self, x: np.ndarray) -> np.ndarray:
        result = self.request.infer({0: x})
        return np.array(result[self._output], dtype=np.float32, copy=True)

    def synchronize(self) -> None:
        """``infer()`` is synchronous."""

    def precisions(self) -> dict[str, int]:
        """Executed convolutions by runtime precision (see :func:`precision_summary`)."""
        return precision_summary(self.compiled)
