#!/usr/bin/env python3
"""Time ONNX models in ONNX Runtime (CPU); writes the same JSON schema as `yolocomp bench`.

    python deploy/cpu/bench.py --model fp32.onnx int8.onnx --runs 50 --json bench.json
"""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common.app import bench_parser, run_bench  # noqa: E402
from ort_model import OrtModel  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = bench_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all)")
    parser.add_argument("--imgsz", type=int, default=None, help="input size for ONNX files with a dynamic size")
    args = parser.parse_args(argv)
    import onnxruntime

    result = run_bench(partial(OrtModel, threads=args.threads, imgsz=args.imgsz), args, device="cpu",
                       onnxruntime=onnxruntime.__version__)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
