"""Options of the ``prune`` stage: importance criterion, target, sparsity / attention training, fine-tune."""

from __future__ import annotations

from dataclasses import dataclass

from yolocomp.config.options import non_negative, option, positive, valid_ratio
from yolocomp.config.train import TrainingOptions

PRUNE_METHODS = ("bn", "cap", "l1", "random")
ATTENTIONS = ("eca", "se")
SPARSITY_SCHEDULES = ("constant", "linear_decay")


@dataclass
class PruneConfig(TrainingOptions):
    method: str = option("bn", "channel importance: BN-γ, CAP attention, L1 filter norm or random",
                         hint="use bn, cap, l1 or random", choices=PRUNE_METHODS)
    ratio: float = option(0.3, "share of prunable channels to remove, in (0, 1)", hint="use a share of channels such as 0.3",
                          check=valid_ratio)
    flops_reduction: float | None = option(None, "share of GFLOPs to remove, in (0, 1) (replaces ratio)",
                                           hint="use a share of GFLOPs such as 0.35", check=valid_ratio)
    sparsity_epochs: int = option(0, "BN-γ sparsity / CAP attention training epochs (0 = skip)",
                                  hint="use 0 to skip sparsity training", check=non_negative)
    finetune_epochs: int = option(0, "fine-tune epochs after pruning (0 = skip)", hint="use 0 to skip fine-tuning",
                                  check=non_negative)
    s: float = option(1e-4, "L1 sparsity strength on BN γ", hint="use a sparsity strength such as 1e-4", check=positive)
    s_schedule: str = option("constant", "sparsity strength over the epochs", hint="use constant or linear_decay",
                             choices=SPARSITY_SCHEDULES)
    attention: str = option("eca", "CAP's attention gate", hint="use eca or se", choices=ATTENTIONS)
    min_channels: int = option(8, "fewest channels a layer keeps", hint="use a channel floor such as 8", check=positive)
    round_to: int = option(8, "kept channels are a multiple of this", hint="use a channel multiple such as 8", check=positive)
    max_layer_ratio: float | None = option(None, "largest share of one layer's channels to remove (unset: no cap)",
                                           hint="use a per-layer cap such as 0.6", check=valid_ratio)
    ignore: list[int] = option([], "layer indices never pruned", hint="use a list of layer indices such as [9, 10]",
                               metavar="LAYER")

    @classmethod
    def problems(cls, values: dict) -> list[str]:
        if values.get("flops_reduction") is not None and values.get("ratio") is not None:
            return ["sets both ratio and flops_reduction; keep one of them"]
        return []

    def target(self) -> dict:
        """The pruning target as prune_model takes it: a FLOPs reduction when set, else the channel ratio."""
        if self.flops_reduction is not None:
            return {"ratio": None, "flops_reduction": self.flops_reduction}
        return {"ratio": self.ratio, "flops_reduction": None}
