"""``--runtime openvino|onnxruntime`` for the CPU scripts: which model class runs a path."""

from __future__ import annotations

import argparse
from pathlib import Path

RUNTIMES = ("onnxruntime", "openvino")


def add_runtime_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runtime", choices=RUNTIMES, default=None,
                        help="onnxruntime (.onnx) or openvino (an *_openvino_model folder, .xml, or an .onnx read by "
                             "OpenVINO); default: openvino for a folder or .xml, else onnxruntime")
    parser.add_argument("--threads", type=int, default=None, help="inference threads (default: all cores)")
    parser.add_argument("--imgsz", type=int, default=None, help="input size for models with a dynamic size")


def pick_runtime(path: str | Path, runtime: str | None) -> str:
    path = Path(path)
    if runtime:
        if runtime == "onnxruntime" and (path.is_dir() or path.suffix.lower() == ".xml"):
            raise SystemExit(f"{path} is an OpenVINO model: use --runtime openvino")
        return runtime
    return "openvino" if path.is_dir() or path.suffix.lower() == ".xml" else "onnxruntime"


def load_model(path: str | Path, runtime: str | None, threads: int | None = None, imgsz: int | None = None):  # noqa: ANN201
    """An OrtModel or OvModel for ``path`` (both with the interface deploy/common/app.py expects)."""
    if pick_runtime(path, runtime) == "openvino":
        from ov_model import OvModel

        return OvModel(path, threads, imgsz)
    from ort_model import OrtModel

    return OrtModel(path, threads, imgsz)


def runtime_version(runtime: str) -> dict:
    """The runtime's version for the bench JSON's host block (empty when it is not installed)."""
    try:
        module = __import__(runtime)
    except ImportError:
        return {}
    return {runtime: module.__version__}
