#!/usr/bin/env python3
"""Time TensorRT engines (Jetson or any NVIDIA GPU); writes the same JSON schema as `yolocomp bench`.

    python3 deploy/jetson/bench.py --model fp16.engine int8.engine --runs 200 --json bench.json

Latency is one synchronous call (host->device copy, inference, device->host copy), as an application sees it;
`trtexec --loadEngine=...` reports the GPU compute time alone. Fix the clocks first (see README: nvpmodel, jetson_clocks).
"""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common.app import bench_parser, run_bench  # noqa: E402


def _power_mode() -> str | None:
    """The Jetson power mode (nvpmodel -q), or None elsewhere."""
    import shutil
    import subprocess

    if not shutil.which("nvpmodel"):
        return None
    try:
        out = subprocess.run(["nvpmodel", "-q"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return " ".join(out.split()) or None


def _device_name() -> str | None:
    """The Jetson module (device tree) or the GPU name from nvidia-smi."""
    import shutil
    import subprocess

    model = Path("/proc/device-tree/model")
    if model.is_file():
        return model.read_text(errors="ignore").strip("\x00 \n")
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
        return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None
    return None


def main(argv: list[str] | None = None) -> dict:
    parser = bench_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--dla-core", type=int, default=None, help="run DLA engines on this core")
    args = parser.parse_args(argv)
    import tensorrt
    from trt_model import TrtModel  # imported late so --help works without TensorRT

    device = "cuda:0" if args.dla_core is None else f"dla:{args.dla_core}"
    result = run_bench(partial(TrtModel, dla_core=args.dla_core), args, device=device, tensorrt=tensorrt.__version__,
                       gpu=_device_name(), power_mode=_power_mode())
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
