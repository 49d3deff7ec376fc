#!/usr/bin/env python3
"""Detect objects with a TensorRT engine (Jetson or any NVIDIA GPU): image, folder, video or camera; JSON summary.

    python3 deploy/jetson/infer.py --model yolov8n-int8.engine --source 0 --out runs/jetson --save
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common.app import infer_parser, run_infer  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = infer_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--dla-core", type=int, default=None, help="run a DLA engine on this core (default: from the engine's JSON)")
    args = parser.parse_args(argv)
    from trt_model import TrtModel  # imported late so --help works without TensorRT

    summary = run_infer(TrtModel(args.model, args.dla_core), args)
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}, indent=2))
    return summary


if __name__ == "__main__":
    main()
