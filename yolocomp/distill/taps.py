"""Forward hooks that capture the neck features feeding the Detect head.

Hooks are small objects (not lambdas) so that a model or method holding them still pickles (DDP) and deep-copies
(Ultralytics' EMA): a :class:`FeatureTap` drops its cached tensors and hook handles when pickled or copied.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from yolocomp.errors import UserError


class StopForward(Exception):
    """Raised by a tap after the deepest layer it needs, so a teacher run skips the rest of the network."""


class _TapHook:
    """Forward hook storing one layer's output in its tap under the level index."""

    def __init__(self, tap: FeatureTap, level: int, stop: bool = False):
        self.tap = tap
        self.level = level
        self.stop = stop

    def __call__(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self.tap.features[self.level] = output
        if self.stop and self.tap.stop_early:
            raise StopForward


class FeatureTap:
    """Captures the outputs of ``model.model[i]`` for each ``i`` in ``layers`` (one entry per FPN level)."""

    def __init__(self, layers: Sequence[int], stop_early: bool = False):
        self.layers = [int(i) for i in layers]
        self.stop_early = stop_early  # only for a teacher whose outputs past the taps are not needed
        self.features: dict[int, torch.Tensor] = {}
        self.handles: list = []

    def attach(self, model: nn.Module) -> FeatureTap:
        self.detach()
        layers = model.model
        deepest = max(range(len(self.layers)), key=lambda k: self.layers[k])
        for level, idx in enumerate(self.layers):
            if not -len(layers) <= idx < len(layers):
                raise UserError(f"feature layer {idx} does not exist (model has {len(layers)} layers); pick e.g. {head_input_layers(model)}")
            hook = _TapHook(self, level, stop=level == deepest)
            self.handles.append(layers[idx].register_forward_hook(hook))
        return self

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.clear()

    def clear(self) -> None:
        self.features.clear()

    def get(self) -> list[torch.Tensor]:
        missing = [self.layers[k] for k in range(len(self.layers)) if k not in self.features]
        if missing:
            raise RuntimeError(f"feature taps at layers {missing} did not fire; was the model run?")
        return [self.features[k] for k in range(len(self.layers))]

    def __getstate__(self) -> dict:
        return {"layers": self.layers, "stop_early": self.stop_early, "features": {}, "handles": []}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


def head_input_layers(model: nn.Module) -> list[int]:
    """Indices of the layers whose outputs feed the Detect head (P3/P4/P5 for YOLOv8)."""
    f = model.model[-1].f
    return [int(i) for i in (f if isinstance(f, (list, tuple)) else [f])]


def run_taps(model: nn.Module, tap: FeatureTap, x: torch.Tensor) -> object:
    """Run ``model`` on ``x``; return its output (or None when the tap stopped the forward early)."""
    tap.clear()
    try:
        return model(x)
    except StopForward:
        return None


@torch.no_grad()
def probe_shapes(model: nn.Module, tap: FeatureTap, imgsz: int, device: torch.device | str) -> list[tuple[int, int, int]]:
    """(channels, height, width) of every tapped level for one ``imgsz`` image, without changing train/eval mode."""
    was_training = model.training
    model.eval()
    try:
        run_taps(model, tap, torch.zeros(1, 3, imgsz, imgsz, device=device))
        shapes = [tuple(f.shape[1:]) for f in tap.get()]
    finally:
        model.train(was_training)
        tap.clear()
    return shapes
