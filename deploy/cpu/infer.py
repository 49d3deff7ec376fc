#!/usr/bin/env python3
"""Detect objects with an ONNX model in ONNX Runtime (CPU): image, folder, video or camera; JSON summary.

    python deploy/cpu/infer.py --model yolov8n.onnx --source images/ --out runs/cpu --save
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common.app import infer_parser, run_infer  # noqa: E402
from ort_model import OrtModel  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = infer_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all)")
    parser.add_argument("--imgsz", type=int, default=None, help="input size for ONNX files with a dynamic size")
    args = parser.parse_args(argv)
    summary = run_infer(OrtModel(args.model, args.threads, args.imgsz), args)
    brief = {k: v for k, v in summary.items() if k != "results"}
    print(json.dumps(brief, indent=2))
    return summary


if __name__ == "__main__":
    main()
