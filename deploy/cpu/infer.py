#!/usr/bin/env python3
"""Detect objects on the CPU with ONNX Runtime (.onnx) or OpenVINO (an *_openvino_model folder or .xml): image, folder,
video or camera; JSON summary with class names from the model's metadata.

    python deploy/cpu/infer.py --model yolov8n.onnx --source images/ --out runs/cpu --save
    python deploy/cpu/infer.py --model model_int8_openvino_model --runtime openvino --source images/ --out runs/ov
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common.app import infer_parser, run_infer  # noqa: E402
from runtime import add_runtime_flags, load_model  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = infer_parser(__doc__.strip().splitlines()[0])
    add_runtime_flags(parser)
    args = parser.parse_args(argv)
    summary = run_infer(load_model(args.model, args.runtime, args.threads, args.imgsz), args)
    brief = {k: v for k, v in summary.items() if k != "results"}
    print(json.dumps(brief, indent=2))
    return summary


if __name__ == "__main__":
    main()
