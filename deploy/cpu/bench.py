#!/usr/bin/env python3
"""Time models on the CPU in ONNX Runtime or OpenVINO; writes the same JSON schema as `yolocomp bench`.

    python deploy/cpu/bench.py --model fp32.onnx int8.onnx --runs 50 --json bench.json
    python deploy/cpu/bench.py --model model_openvino_model model_int8_openvino_model --runtime openvino --threads 1
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common.app import bench_parser, run_bench  # noqa: E402
from runtime import add_runtime_flags, load_model, pick_runtime, runtime_version  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = bench_parser(__doc__.strip().splitlines()[0])
    add_runtime_flags(parser)
    args = parser.parse_args(argv)
    runtimes = sorted({pick_runtime(p, args.runtime) for p in args.model})
    host = {}
    for runtime in runtimes:
        host.update(runtime_version(runtime))
    result = run_bench(lambda p: load_model(p, args.runtime, args.threads, args.imgsz), args, device="cpu", **host)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
