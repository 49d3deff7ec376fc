"""COCO evaluation and speed benchmarks with one preprocessing and one NMS for every backend."""

from yolocomp.eval.backends import make_runner
from yolocomp.eval.bench import bench
from yolocomp.eval.evaluate import evaluate
from yolocomp.eval.info import model_info

__all__ = ["bench", "evaluate", "make_runner", "model_info"]
