"""Shared teacher handling for every distillation method.

The teacher is loaded (path) or copied (module) in ``prepare``, frozen, put in eval mode, moved to the student's
device and kept on the method, never on the student, so it never reaches Ultralytics' checkpoints or EMA. It runs once
per batch inside ``extra_loss``, i.e. inside the trainer's autocast context, under ``torch.no_grad()``.

The adapters (and FGD's context blocks) are built in ``prepare`` and registered on the student as training-only
modules (:func:`yolocomp.methods.add_training_module`), before Ultralytics builds its optimizer: its optimizer, AMP
scaler, DDP all-reduce, gradient clipping, EMA and resumable checkpoints handle them like any layer. ``finalize`` (and
:func:`yolocomp.integration.save_model`) strip them, so the delivered student is a plain Ultralytics model.
"""

from __future__ import annotations

from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from yolocomp.distill.adapters import make_adapter
from yolocomp.distill.masks import images_without_boxes, with_teacher_boxes
from yolocomp.distill.taps import FeatureTap, head_input_layers, probe_shapes, run_taps
from yolocomp.errors import UserError
from yolocomp.methods import Method, add_training_module, strip_training_modules, training_module


def teacher_box_confidence(conf: float | None) -> float | None:
    """A checked ``teacher_box_conf``: in (0, 1), or None to build masks from GT boxes only."""
    if conf is not None and not 0 < conf < 1:
        raise UserError(f"teacher_box_conf={conf} is outside (0, 1); use e.g. 0.25, or None for GT boxes only")
    return None if conf is None else float(conf)


_RUNTIME = ("teacher", "student_tap", "teacher_tap", "aux", "levels")


def _unwrap(model: nn.Module) -> nn.Module:
    from yolocomp.integration import unwrap

    return unwrap(model)


def _head(model: nn.Module) -> nn.Module:
    return model.model[-1]


class TeacherDistiller(Method):
    """Base class: owns the frozen teacher, the feature taps and the training-only modules (adapters, ...).

    ``teacher``: an Ultralytics detection checkpoint path or a DetectionModel (copied, never modified) with the
    student's classes, detection levels and DFL bins. ``layers``: student layer indices to tap (default: the inputs
    of Detect, ``model.model[-1].f``, P3/P4/P5); ``teacher_layers``: the teacher's (default: ``layers`` when given,
    else the teacher's Detect inputs). Tapped levels must have equal spatial sizes; widths may differ (adapters).

    Subclasses implement :meth:`build_aux` (training-only modules, given per-level student/teacher channels) and
    :meth:`losses` (the loss dict from student/teacher features, outputs and the batch). The training-only modules
    are registered on the student under the method's ``name``.
    """

    name = "kd"
    uses_features = True  #: False for methods that only need the head outputs (no taps, full teacher forward)
    #: masks from GT boxes (FGD, FGFI): images without GT boxes use the teacher's detections above this confidence
    teacher_box_conf: float | None = None

    def __init__(self, teacher: str | Path | nn.Module, layers: list[int] | None = None, teacher_layers: list[int] | None = None):
        if isinstance(teacher, (str, Path)):
            self.teacher_source: str | nn.Module = str(teacher)
        elif isinstance(teacher, nn.Module):
            self.teacher_source = teacher
        else:
            raise UserError(f"teacher must be a checkpoint path or a model, got {type(teacher).__name__}; pass e.g. yolov8s.pt")
        self.layers = [int(i) for i in layers] if layers else None
        self.teacher_layers = [int(i) for i in teacher_layers] if teacher_layers else None
        for key in _RUNTIME:
            setattr(self, key, None)

    # --- pickling (DDP pickles callbacks): runtime state is rebuilt by attach() ----------------------------------------
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for key in _RUNTIME:
            state[key] = None
        return state

    # --- setup ---------------------------------------------------------------------------------------------------------
    def load_teacher(self) -> nn.Module:
        """A frozen eval-mode copy of the teacher (the caller's module is never modified)."""
        from yolocomp.integration import load_model

        source = self.teacher_source
        teacher = load_model(source) if isinstance(source, str) else deepcopy(load_model(source))
        # Not BN-folded: an unfused teacher computes exactly what an identical student computes, so the losses and their
        # gradients are exactly 0 there. Folded, float rounding leaves ~1e-8 gradients that Adam normalises into
        # lr-sized random steps, and a model distilled into itself drifts (tools/README.md).
        teacher = teacher.float().eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher

    def resolve_layers(self, student: nn.Module, teacher: nn.Module) -> tuple[list[int], list[int]]:
        s_layers = self.layers or head_input_layers(student)
        t_layers = self.teacher_layers or (self.layers if self.layers else head_input_layers(teacher))
        return s_layers, t_layers

    def check_compatible(self, student: nn.Module, teacher: nn.Module | None = None) -> None:
        """Refuse teachers that cannot teach this student (class count, number of feature levels, DFL bins)."""
        teacher = teacher if teacher is not None else self.load_teacher()
        s_head, t_head = _head(student), _head(teacher)
        if s_head.nc != t_head.nc:
            raise UserError(
                f"teacher predicts {t_head.nc} classes but the student {s_head.nc}; use a teacher trained on the same classes"
            )
        s_layers, t_layers = self.resolve_layers(student, teacher)
        if len(s_layers) != len(t_layers):
            raise UserError(
                f"student taps {len(s_layers)} feature levels {s_layers} but the teacher {len(t_layers)} {t_layers}; "
                "use a teacher with the same number of detection levels (or pass matching layers)"
            )
        if s_head.nl != t_head.nl:
            raise UserError(
                f"student head has {s_head.nl} detection levels but the teacher {t_head.nl}; use a teacher of the same family"
            )
        s_bins, t_bins = getattr(s_head, "reg_max", None), getattr(t_head, "reg_max", None)
        if s_bins != t_bins and not (s_bins and t_bins and 2 <= s_bins < t_bins):
            raise UserError(f"student head uses reg_max={s_bins} but the teacher {t_bins}; use a teacher of the same "
                            "family (a student may have fewer DFL bins than its teacher, not more)")

    def prepare(self, model: nn.Module) -> bool:
        """Load and check the teacher; build the training-only modules on the student (reused when resumed)."""
        student = _unwrap(model)
        device = next(student.parameters()).device
        if self.teacher is None:
            teacher = self.load_teacher()
            self.check_compatible(student, teacher)
            self.teacher = teacher.to(device)
        if not self.uses_features:
            self.aux = nn.ModuleDict()
            return False
        s_layers, t_layers = self.resolve_layers(student, self.teacher)
        self.levels = self.probe_levels(student, s_layers, t_layers, device)
        self.aux = training_module(student, self.name)
        if self.aux is not None:
            return False  # resumed: the checkpoint holds the trained modules
        self.aux = add_training_module(student, self.name, self.build_aux(self.levels).to(device))
        return True

    def probe_levels(self, student: nn.Module, s_layers: list[int], t_layers: list[int], device: torch.device) -> list[tuple[int, int]]:
        """(student, teacher) channels per tapped level; refuses levels whose spatial sizes differ."""
        imgsz = int(max(float(student.stride.max()), 32)) * 2
        student_tap = FeatureTap(s_layers).attach(student)
        teacher_tap = FeatureTap(t_layers, stop_early=not self.needs_teacher_head()).attach(self.teacher)
        try:  # the taps come off again: the EMA, built next, must not copy them
            s_shapes = probe_shapes(student, student_tap, imgsz, device)
            t_shapes = probe_shapes(self.teacher, teacher_tap, imgsz, device)
        finally:
            student_tap.detach()
            teacher_tap.detach()
        for level, (s, t) in enumerate(zip(s_shapes, t_shapes)):
            if s[1:] != t[1:]:
                raise UserError(
                    f"feature level {level}: student layer {s_layers[level]} is {s[1]}x{s[2]} but teacher layer "
                    f"{t_layers[level]} is {t[1]}x{t[2]} for a {imgsz}px input; pass layers with matching strides"
                )
        return [(s[0], t[0]) for s, t in zip(s_shapes, t_shapes)]

    def attach_taps(self, model: nn.Module) -> None:
        """Feature taps on the (prepared) student and the teacher; after the EMA exists, so it never copies them."""
        student = _unwrap(model)
        for tap in (self.student_tap, self.teacher_tap):
            if tap is not None:
                tap.detach()
        self.student_tap = self.teacher_tap = None
        if self.uses_features:
            s_layers, t_layers = self.resolve_layers(student, self.teacher)
            self.student_tap = FeatureTap(s_layers).attach(student)
            self.teacher_tap = FeatureTap(t_layers, stop_early=not self.needs_teacher_head()).attach(self.teacher)
            self.aux = training_module(student, self.name)

    def setup(self, student: nn.Module, device: torch.device | str | None = None) -> None:
        """``prepare`` and taps in one call, without a trainer (tests, custom loops); ``student`` is moved to ``device``."""
        self.release()
        student = _unwrap(student)
        if device is not None:
            student.to(torch.device(device))
        self.prepare(student)
        self.attach_taps(student)

    def needs_teacher_head(self) -> bool:
        return False

    def needs_teacher_head_for(self, batch: dict) -> bool:
        """Whether this batch's losses read the teacher's head output (e.g. its boxes for unlabelled images)."""
        return self.needs_teacher_head() or (self.teacher_box_conf is not None and bool(images_without_boxes(batch).any()))

    def mask_batch(self, batch: dict, teacher_out: Any) -> dict:
        """The batch whose boxes build GT masks: images without GT boxes take the teacher's confident detections."""
        if self.teacher_box_conf is None:
            return batch
        return with_teacher_boxes(batch, teacher_out, self.teacher_box_conf)

    def build_aux(self, levels: list[tuple[int, int]]) -> nn.Module:
        """Training-only modules; default: one adapter per level (student width -> teacher width)."""
        return nn.ModuleDict({"adapters": nn.ModuleList(make_adapter(s, t) for s, t in levels)})

    def release(self) -> None:
        for tap in (self.student_tap, self.teacher_tap):
            if tap is not None:
                tap.detach()
        for key in _RUNTIME:
            setattr(self, key, None)

    # --- Method hooks --------------------------------------------------------------------------------------------------
    def attach(self, trainer: Any) -> None:
        if self.teacher is None:  # prepare ran in another process (never expected) or the method was released
            self.prepare(trainer.model)
        self.attach_taps(trainer.model)

    def extra_loss(self, trainer: Any, batch: dict, preds: Any) -> dict[str, torch.Tensor]:
        if self.teacher is None or (self.uses_features and self.student_tap is None):
            self.prepare(trainer.model)
            self.attach_taps(trainer.model)
        if self.uses_features:  # a teacher forward may stop at the taps unless this batch needs its detections
            self.teacher_tap.stop_early = not self.needs_teacher_head_for(batch)
        with torch.no_grad():
            teacher_out = run_taps(self.teacher, self.teacher_tap, batch["img"]) if self.uses_features else self.teacher(batch["img"])
        try:
            s_feats = self.student_tap.get() if self.uses_features else []
            t_feats = [f.detach() for f in self.teacher_tap.get()] if self.uses_features else []
            return self.losses(s_feats, t_feats, preds, teacher_out, batch)
        finally:
            for tap in (self.student_tap, self.teacher_tap):
                if tap is not None:
                    tap.clear()

    def losses(self, s_feats: list[torch.Tensor], t_feats: list[torch.Tensor], preds: Any, teacher_out: Any, batch: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def adapt(self, level: int, feat: torch.Tensor) -> torch.Tensor:
        return self.aux["adapters"][level](feat.float())

    def on_train_end(self, trainer: Any) -> None:
        self.release()

    def finalize(self, model: nn.Module) -> nn.Module:
        # Taps live on the training model only and the teacher was never part of it; adapters go here.
        return strip_training_modules(model)

    def __repr__(self) -> str:
        source = self.teacher_source if isinstance(self.teacher_source, str) else type(self.teacher_source).__name__
        return f"{type(self).__name__}(teacher={source!r})"
