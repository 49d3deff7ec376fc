"""Trainer settings for label-free training (no image has a label; the teacher supplies every target)."""

from __future__ import annotations

from typing import Any


def label_free_overrides() -> dict[str, Any]:
    """Ultralytics trainer overrides when the training data has no labels at all.

    * ``box``, ``cls``, ``dfl`` = 0: Ultralytics' detection loss on empty targets would only teach "background
      everywhere"; with zero gains it is absent and its columns stay 0, so the distillation terms are the whole loss.
    * ``val`` = False: no labels, no meaningful fitness. Ultralytics still validates the final epoch, but without
      per-epoch validation every epoch's fitness stays None, so each save writes best.pt equal to last.pt and the
      weights :func:`yolocomp.integration.train` loads ("best") are the last epoch's.
    """
    return {"box": 0.0, "cls": 0.0, "dfl": 0.0, "val": False}
