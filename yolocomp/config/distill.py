"""Options of the ``distill`` stage: the teacher, the method and the student's training."""

from __future__ import annotations

from dataclasses import dataclass

from yolocomp.config.options import at_least, option
from yolocomp.config.train import TrainingOptions

#: ``logit`` is head KD; ``none`` fine-tunes without a teacher (the baseline).
DISTILL_METHODS = ("fgd", "fgfi", "logit", "none")


@dataclass
class DistillConfig(TrainingOptions):
    teacher: str | None = option(None, "teacher checkpoint (.pt) with the same classes (unset: the uncompressed input model)",
                                 hint="give a teacher checkpoint path (null = the previous stage's input model)")
    method: str = option("fgd", "FGD, fine-grained imitation, head-output (logit) KD, or none",
                         hint="use fgd, fgfi, logit or none", choices=DISTILL_METHODS)
    epochs: int = option(1, "training epochs", hint="use a whole number of epochs such as 3", check=at_least(1))
    layers: list[int] | None = option(None, "student layers whose features are imitated (unset: the Detect inputs)",
                                      hint="use a list of layer indices such as [15, 18, 21]", metavar="LAYER")
    loss_weights: dict | None = option(None, "the method's loss weights, e.g. {alpha: 1e-3}", cli=False,
                                       hint="use a mapping of the method's settings such as {alpha: 0.001}")
