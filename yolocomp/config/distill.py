"""Options of the ``distill`` stage: the teacher, the method and the student's training."""

from __future__ import annotations

from dataclasses import dataclass

from yolocomp.config.options import at_least, option, valid_ratio
from yolocomp.config.train import TrainingOptions

#: ``logit`` is head KD; ``none`` fine-tunes without a teacher (the baseline).
DISTILL_METHODS = ("block", "fgd", "fgfi", "logit", "none")


@dataclass
class DistillConfig(TrainingOptions):
    teacher: str | None = option(None, "teacher checkpoint (.pt) with the same classes (unset: the uncompressed input model)",
                                 hint="give a teacher checkpoint path (null = the previous stage's input model)")
    method: str = option("fgd", "FGD, fine-grained imitation, head-output (logit) KD, or none",
                         hint="use block, fgd, fgfi, logit or none", choices=DISTILL_METHODS)
    epochs: int = option(1, "training epochs", hint="use a whole number of epochs such as 3", check=at_least(1))
    layers: list[int] | None = option(None, "student layers whose features are imitated (unset: the Detect inputs)",
                                      hint="use a list of layer indices such as [15, 18, 21]", metavar="LAYER")
    images: str | None = option(None, "unlabelled images (folder or .txt list) to train on beside --data; the teacher "
                                "supplies their targets", hint="give a folder of images or a .txt list of image paths")
    label_free: bool = option(False, "train on --images alone: no labels at all (the data yaml only measures AP)",
                              hint="use true with images")
    pseudo_conf: float | None = option(None, "teacher detections above this confidence become labels of the unlabelled "
                                       "images (unset: no pseudo-labels)", hint="use a confidence such as 0.5",
                                       check=valid_ratio)
    freeze_bn: bool = option(False, "keep BatchNorm in eval mode while distilling (for a converged student)",
                             hint="use true or false")
    loss_weights: dict | None = option(None, "the method's loss weights, e.g. {alpha: 1e-3}", cli=False,
                                       hint="use a mapping of the method's settings such as {alpha: 0.001}")
