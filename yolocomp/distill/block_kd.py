"""Block-output distillation for a pruned student: every backbone / neck layer imitates the teacher's same layer.

A pruned student keeps a subset of each layer's output channels (``channel_map``: layer index -> the teacher's
channel indices it kept, as :func:`yolocomp.prune.pruner.prune_model` reports them), so its features can be compared
with the teacher's channel for channel, with no adapter: the loss of layer ``i`` is the squared error between the
student's output and the teacher's kept channels, divided by the mean square of those teacher channels (a relative
error, so layers of different scale count alike), averaged over the tapped layers. This is the objective of block
reconstruction (:mod:`yolocomp.recon`) applied end to end on every training batch: a dense signal at every layer, where
head-output KD alone gives one at the end of a network whose early layers lost channels.

The head-output terms of :class:`~yolocomp.distill.head_kd.HeadKD` come with it (one teacher forward for both).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from yolocomp.distill.head_kd import HeadKD
from yolocomp.errors import UserError

#: weight of the block-output term: at 30 it also lowers the head losses faster than at 1 (tools/README.md)
FEATURE_WEIGHT = 30.0
#: the conv whose output is the block's output, per block type (a plain Conv layer is its own output conv)
OUTPUT_CONV = {"C2f": "cv2", "C3k2": "cv2", "C2PSA": "cv2", "SPPF": "cv2", "SPP": "cv2", "C3": "cv3", "C3k": "cv3"}


def ramped_channels(layer: nn.Module) -> torch.Tensor | None:
    """The output channels a progressive step is driving to zero in this layer (bool mask), or None."""
    from yolocomp.prune.ramp import RampGate

    conv = getattr(layer, OUTPUT_CONV.get(type(layer).__name__, ""), layer)
    return conv.drop if isinstance(conv, RampGate) else None


def feature_layers(model: nn.Module) -> list[int]:
    """Indices of the layers with parameters before the head (Conv, C2f, SPPF, ...): what a cut changes."""
    return [i for i, m in enumerate(model.model[:-1]) if any(True for _ in m.parameters())]


class BlockKD(HeadKD):
    """Relative-MSE imitation of every layer's kept channels plus head-output KD (the CLI's ``--method block``).

    ``channel_map``: layer -> the teacher's output channels the student's layer holds (layers not listed have the
    teacher's channels); ``feature_weight`` scales the mean relative error over the layers. Channels a progressive
    step is ramping to zero (:mod:`yolocomp.prune.ramp`) are left out: they are on their way out, not to be held.
    """

    name = "block"
    uses_features = True

    def __init__(self, teacher: str | Path | nn.Module, temperature: float = 2.0, cls_weight: float = 1.0,
                 dfl_weight: float = 1.0, confidence_weighting: bool = True, feature_weight: float = FEATURE_WEIGHT,
                 channel_map: Mapping[int, Sequence[int]] | None = None, layers: list[int] | None = None):
        super().__init__(teacher, temperature, cls_weight, dfl_weight, confidence_weighting)
        if feature_weight < 0:
            raise UserError(f"block KD feature_weight={feature_weight} must be >= 0; use e.g. {FEATURE_WEIGHT:g}")
        self.feature_weight = float(feature_weight)
        self.channel_map = {int(k): [int(c) for c in v] for k, v in (channel_map or {}).items()}
        self.layers = [int(i) for i in layers] if layers else None
        self.teacher_layers = None
        self._index: dict[int, torch.Tensor] = {}
        self._ramped: dict[int, torch.Tensor] = {}

    def attach_taps(self, model: nn.Module) -> None:
        from yolocomp.integration import unwrap

        super().attach_taps(model)
        student = unwrap(model)
        masks = {i: ramped_channels(student.model[i]) for i in self.resolve_layers(student, student)[0]}
        self._ramped = {i: m for i, m in masks.items() if m is not None}

    def resolve_layers(self, student: nn.Module, teacher: nn.Module) -> tuple[list[int], list[int]]:
        layers = self.layers or feature_layers(student)
        return layers, layers

    def check_compatible(self, student: nn.Module, teacher: nn.Module | None = None) -> None:
        teacher = teacher if teacher is not None else self.load_teacher()
        if len(student.model) != len(teacher.model):
            raise UserError(f"block KD pairs layers one to one, but the student has {len(student.model)} layers and the "
                            f"teacher {len(teacher.model)}; use the uncompressed original of the student as teacher")
        super().check_compatible(student, teacher)

    def probe_levels(self, student: nn.Module, s_layers: list[int], t_layers: list[int], device: torch.device) -> list[tuple[int, int]]:
        levels = super().probe_levels(student, s_layers, t_layers, device)
        for layer, (s, t) in zip(s_layers, levels):
            kept = self.channel_map.get(layer)
            if kept is None and s != t:
                raise UserError(f"layer {layer} has {s} channels in the student and {t} in the teacher, and no channel map "
                                "says which are kept; block KD needs the teacher's own pruned copy (yolocomp prune "
                                "--recover kd passes the map), use --method fgd, fgfi or logit otherwise")
            if kept is not None and (len(kept) != s or max(kept, default=-1) >= t):
                raise UserError(f"channel map of layer {layer} lists {len(kept)} channels of {t}, the student has {s}")
        return levels

    def build_aux(self, levels: list[tuple[int, int]]) -> nn.Module:
        return nn.ModuleDict()  # channels are compared one to one: nothing to learn besides the student

    def _kept(self, layer: int, device: torch.device) -> torch.Tensor | None:
        if layer not in self.channel_map:
            return None
        index = self._index.get(layer)
        if index is None or index.device != device:
            index = self._index[layer] = torch.as_tensor(self.channel_map[layer], device=device)
        return index

    def losses(self, s_feats: list[torch.Tensor], t_feats: list[torch.Tensor], preds: Any, teacher_out: Any,
               batch: dict) -> dict[str, torch.Tensor]:
        out = super().losses(s_feats, t_feats, preds, teacher_out, batch)
        errors = []
        for layer, s, t in zip(self.student_tap.layers, s_feats, t_feats):
            kept = self._kept(layer, t.device)
            t = (t if kept is None else t.index_select(1, kept)).float()
            ramped = self._ramped.get(layer)
            if ramped is not None:
                s, t = s[:, ~ramped], t[:, ~ramped]
            errors.append((s.float() - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-8))
        out["kdfeat_loss"] = self.feature_weight * torch.stack(errors).mean()
        return out

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_index"], state["_ramped"] = {}, {}
        return state

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, feature_weight={self.feature_weight}, mapped_layers={len(self.channel_map)})"
