"""Integration with Ultralytics, the only package that knows its trainer's internals.

* :mod:`~yolocomp.integration.hooks`: where each method hook runs (callbacks, criterion wrapper, step pre-hook,
  ``prepare`` before the optimizer), :func:`attach` for a user's ``YOLO`` object;
* :mod:`~yolocomp.integration.trainer`: the CLI's :class:`CompressionTrainer`, :func:`train` and resume;
* :mod:`~yolocomp.integration.io`: checkpoint and data-yaml I/O;
* :mod:`~yolocomp.integration.access`: small helpers methods use instead of trainer attributes.
"""

from yolocomp.integration.hooks import CallbackHub, attach, unwrap, with_prepare
from yolocomp.integration.io import load_model, mirror_dataset, resolve_data, save_model
from yolocomp.integration.trainer import CompressionTrainer, TrainResult, is_resumable, resume_interrupted, train

__all__ = [
    "CallbackHub",
    "CompressionTrainer",
    "TrainResult",
    "attach",
    "is_resumable",
    "load_model",
    "mirror_dataset",
    "resolve_data",
    "resume_interrupted",
    "save_model",
    "train",
    "unwrap",
    "with_prepare",
]
