"""One module per command: each turns a recipe (or keyword arguments) into calls of the method libraries
(prune / distill / quant / export / eval) and writes the command's artifacts and report.

``STAGE_RUNNERS`` maps each model-producing stage to its runner; ``yolocomp run`` chains them.
"""

from __future__ import annotations

from collections.abc import Callable

from yolocomp.commands import distill, export, prune, ptq, qat, train
from yolocomp.commands.common import StageResult

STAGE_RUNNERS: dict[str, Callable[..., StageResult]] = {
    "train": train.run_stage,
    "prune": prune.run_stage,
    "distill": distill.run_stage,
    "ptq": ptq.run_stage,
    "qat": qat.run_stage,
    "export": export.run_stage,
}

__all__ = ["STAGE_RUNNERS", "StageResult"]
