"""COCO evaluation and speed benchmarks with one preprocessing and one NMS for every backend."""

from yolocomp.eval.bench import bench
from yolocomp.eval.evaluate import evaluate
from yolocomp.eval.info import model_info
from yolocomp.eval.runners import make_runner

__all__ = ["bench", "evaluate", "make_runner", "model_info"]
