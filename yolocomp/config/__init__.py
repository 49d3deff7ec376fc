"""Stage configs: one dataclass per stage is the single source of its options, defaults, choices and checks.

Recipes (``stages.<name>``), the generated CLI flags, the API keyword arguments and the ``settings`` in every report
read them; :mod:`yolocomp.config.options` holds the machinery.
"""

from yolocomp.config.bench import BenchConfig
from yolocomp.config.distill import DISTILL_METHODS, DistillConfig
from yolocomp.config.eval import EvalConfig
from yolocomp.config.export import ExportConfig
from yolocomp.config.prune import PRUNE_METHODS, PruneConfig
from yolocomp.config.ptq import CALIBRATORS, PtqConfig
from yolocomp.config.qat import (
    QAT_KD_METHODS,
    QAT_LOW_BIT_LR0,
    QAT_RECONSTRUCTED_DEFAULTS,
    QAT_TRAIN_DEFAULTS,
    QatConfig,
    qat_train_defaults,
)
from yolocomp.config.train import TrainConfig, TrainingOptions

#: Stage name -> its config class, in the order ``yolocomp run`` chains the model-producing ones.
STAGE_CONFIGS: dict[str, type] = {
    "train": TrainConfig,
    "prune": PruneConfig,
    "distill": DistillConfig,
    "ptq": PtqConfig,
    "qat": QatConfig,
    "export": ExportConfig,
    "eval": EvalConfig,
    "bench": BenchConfig,
}

__all__ = [
    "CALIBRATORS", "DISTILL_METHODS", "PRUNE_METHODS", "QAT_KD_METHODS", "QAT_LOW_BIT_LR0", "QAT_RECONSTRUCTED_DEFAULTS",
    "QAT_TRAIN_DEFAULTS", "STAGE_CONFIGS",
    "BenchConfig", "DistillConfig", "EvalConfig", "ExportConfig", "PruneConfig", "PtqConfig", "QatConfig",
    "TrainConfig", "TrainingOptions", "qat_train_defaults",
]
