"""Where each :class:`yolocomp.methods.Method` hook runs inside Ultralytics training, and why.

* ``prepare`` in :meth:`PrepareBeforeOptimizer.set_model_attributes`: the last overridable call of Ultralytics'
  ``BaseTrainer._setup_train`` before the place where Ultralytics prepares its own QAT model ("Prepare the final
  module structure before compile, DDP, and EMA wrap it"), i.e. before layer freezing, compile, DDP, the optimizer and
  the EMA are built. It runs on every DDP rank (each worker rebuilds the trainer), so Ultralytics' own optimizer, AMP
  scaler, DDP all-reduce, gradient clipping and EMA handle every parameter a method adds. The CLI's
  ``CompressionTrainer`` has the mixin; :func:`attach` makes a user's ``YOLO.train`` use ``with_prepare(its trainer)``.
  The mixin's ``get_model`` also keeps a resumed yolocomp checkpoint as-is (a yaml rebuild would drop gates/adapters).
* ``attach`` at ``on_pretrain_routine_end``: runtime state (feature taps, calibration) once the trainer is ready.
* ``extra_loss`` inside the criterion (:class:`ExtraLossCriterion`): Ultralytics' DDP forward is the loss, so the terms
  join the loss vector that Ultralytics scales by batch size, sums, AMP-scales and accumulates; they behave exactly
  like box/cls/dfl and appear as their own columns in the progress bar and results.csv.
* ``before_step`` as an optimizer step pre-hook: it runs inside ``scaler.step(optimizer)``, i.e. after AMP unscaling,
  after all accumulated micro-batches and DDP gradient averaging, once per real optimizer step, and not at all when
  AMP skips a step for inf/NaN gradients.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from yolocomp.errors import UserError
from yolocomp.methods import Method

_EVENTS = (
    "on_pretrain_routine_end",
    "on_train_start",
    "on_train_epoch_start",
    "on_train_batch_start",
    "on_train_epoch_end",
    "on_train_end",
)


def unwrap(model: nn.Module) -> nn.Module:
    """Return the module inside DDP / torch.compile wrappers."""
    from ultralytics.utils.torch_utils import unwrap_model

    return unwrap_model(model)


class ExtraLossCriterion:
    """Wraps Ultralytics' detection criterion and appends every method's extra loss terms.

    Ultralytics' criterion returns ``(loss_vector * batch_size, {name: detached item})``; the trainer sums the
    vector. Appending ``term * batch_size`` keeps the same scaling for the extra terms.
    """

    def __init__(self, base: Any, hub: CallbackHub):
        self.base = base
        self.hub = hub

    def __call__(self, preds: Any, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, items = self.base(preds, batch)
        trainer = self.hub.trainer
        if trainer is None or not unwrap(trainer.model).training:
            return loss, items
        extras: dict[str, torch.Tensor] = {}
        for method in self.hub.methods:
            extras.update(method.extra_loss(trainer, batch, preds))
        if not extras:
            return loss, items
        batch_size = batch["img"].shape[0]
        terms = torch.stack([v.reshape(()).to(loss.dtype) for v in extras.values()]) * batch_size
        items = {**items, **{k: v.detach().reshape(()) for k, v in extras.items()}}
        return torch.cat([loss.reshape(-1), terms]), items

    def update(self) -> None:
        """Forward Ultralytics' per-epoch criterion update (e.g. loss schedules)."""
        if hasattr(self.base, "update"):
            self.base.update()

    def __getattr__(self, name: str) -> Any:
        if name in {"base", "hub"}:  # not yet set (during unpickling): avoid infinite recursion
            raise AttributeError(name)
        return getattr(self.base, name)


class CallbackHub:
    """Holds the methods of one training run and exposes them as Ultralytics callbacks (picklable)."""

    def __init__(self, methods: Iterable[Method]):
        self.methods: list[Method] = list(methods)
        self.trainer: Any = None
        self._step_hook: Any = None
        self._prepared: nn.Module | None = None  # the model prepare() ran on

    # --- pickling: DDP pickles callbacks; the trainer and hook handles are rebuilt in the worker ---------------------
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(trainer=None, _step_hook=None, _prepared=None)
        return state

    def callbacks(self) -> dict[str, Any]:
        return {event: getattr(self, event) for event in _EVENTS}

    def prepare(self, trainer: Any) -> bool:
        """Run every method's ``prepare`` on the trainer's model (before optimizer, EMA and DDP exist)."""
        self.trainer = trainer
        model = unwrap(trainer.model)
        changed = [m.prepare(model) for m in self.methods]  # every method, no short-circuit
        self._prepared = model
        return any(changed)

    # --- Ultralytics events -------------------------------------------------------------------------------------------
    def on_pretrain_routine_end(self, trainer: Any) -> None:
        if self._prepared is not unwrap(trainer.model) and self.prepare(trainer):
            raise UserError(
                f"{', '.join(m.name for m in self.methods)} changed the model after Ultralytics built its optimizer; "
                "attach methods with yolocomp.attach(yolo, ...) or train with a trainer class from "
                "yolocomp.integration.with_prepare(YourTrainer)"
            )
        self.trainer = trainer
        for method in self.methods:
            method.attach(trainer)
        self._register_step_hook(trainer)

    def on_train_start(self, trainer: Any) -> None:
        self.trainer = trainer
        self._wrap_criterion(trainer)

    def on_train_epoch_start(self, trainer: Any) -> None:
        # Resume and NaN-recovery re-create the criterion; re-wrapping is idempotent.
        self._wrap_criterion(trainer)

    def on_train_batch_start(self, trainer: Any) -> None:
        model = unwrap(trainer.model)
        for method in self.methods:
            method.before_batch(model)

    def on_train_epoch_end(self, trainer: Any) -> None:
        for method in self.methods:
            method.on_epoch_end(trainer)

    def on_train_end(self, trainer: Any) -> None:
        from yolocomp.integration.io import strip_finished_checkpoint

        for method in self.methods:
            method.on_train_end(trainer)
        if self._step_hook is not None:
            self._step_hook.remove()
            self._step_hook = None
        for path in {getattr(trainer, "last", None), getattr(trainer, "best", None)} - {None}:
            strip_finished_checkpoint(path)

    # --- helpers ------------------------------------------------------------------------------------------------------
    def _wrap_criterion(self, trainer: Any) -> None:
        model = unwrap(trainer.model)
        criterion = getattr(model, "criterion", None)
        if isinstance(criterion, ExtraLossCriterion):
            return
        model.criterion = ExtraLossCriterion(criterion or model.init_criterion(), self)

    def _register_step_hook(self, trainer: Any) -> None:
        if self._step_hook is not None:
            self._step_hook.remove()
        stepping = [m for m in self.methods if type(m).before_step is not Method.before_step]
        if stepping:
            self._step_hook = trainer.optimizer.register_step_pre_hook(_StepPreHook(self, stepping))

    def finalize(self, model: nn.Module) -> nn.Module:
        """Apply every method's ``finalize`` in order (e.g. strip attention then prune)."""
        for method in self.methods:
            model = method.finalize(model)
        return model


class _StepPreHook:
    """Optimizer step pre-hook calling ``before_step`` (an object, not a lambda, so it pickles)."""

    def __init__(self, hub: CallbackHub, methods: Sequence[Method]):
        self.hub = hub
        self.methods = list(methods)

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for method in self.methods:
            method.before_step(self.hub.trainer)


def hubs(trainer: Any) -> list[CallbackHub]:
    """The hubs whose callbacks are registered on ``trainer`` (found through its callbacks, which DDP workers get)."""
    found: list[CallbackHub] = []
    for callbacks in getattr(trainer, "callbacks", {}).values():
        for fn in callbacks:
            hub = getattr(fn, "__self__", None)
            if isinstance(hub, CallbackHub) and all(hub is not h for h in found):
                found.append(hub)
    return found


def as_training_model(model: nn.Module) -> nn.Module:
    """``model`` in float with every floating parameter trainable (Ultralytics then freezes what it freezes)."""
    model = model.float()
    for param in model.parameters():
        param.requires_grad = param.dtype.is_floating_point
    return model


def carries_compression_state(model: nn.Module) -> bool:
    """True when ``model`` holds yolocomp modules (gates, quantizers, adapters) a yaml rebuild would drop."""
    from yolocomp.methods import TRAINING_MODULES

    return hasattr(model, TRAINING_MODULES) or any(type(m).__module__.startswith("yolocomp.") for m in model.modules())


class PrepareBeforeOptimizer:
    """Trainer mixin running every attached method's ``prepare`` before Ultralytics builds optimizer, EMA and DDP."""

    def get_model(self, cfg: Any = None, weights: Any = None, verbose: bool = True) -> nn.Module:
        # A resumed compression checkpoint: Ultralytics' yaml rebuild + matching-weight copy would silently drop them.
        if isinstance(weights, nn.Module) and carries_compression_state(weights):
            return as_training_model(weights)
        return super().get_model(cfg=cfg, weights=weights, verbose=verbose)

    def set_model_attributes(self) -> None:
        super().set_model_attributes()
        # Last overridable call in _setup_train before Ultralytics' own QAT preparation, freezing, compile, DDP,
        # optimizer and EMA: the model's final structure is fixed here, on every rank.
        for hub in hubs(self):
            hub.prepare(self)


_WITH_PREPARE: dict[type, type] = {}


def with_prepare(trainer_cls: type) -> type:
    """``trainer_cls`` extended by :class:`PrepareBeforeOptimizer` (itself when it already is one).

    DetectionTrainer maps to the importable :class:`~yolocomp.integration.trainer.DetectionTrainerWithPrepare`; other
    classes get a generated subclass (Ultralytics' DDP launcher pickles it by value with cloudpickle)."""
    from yolocomp.integration import trainer  # noqa: F401  (registers DetectionTrainerWithPrepare)

    if issubclass(trainer_cls, PrepareBeforeOptimizer):
        return trainer_cls
    if trainer_cls not in _WITH_PREPARE:
        _WITH_PREPARE[trainer_cls] = type(f"{trainer_cls.__name__}WithPrepare", (PrepareBeforeOptimizer, trainer_cls), {})
    return _WITH_PREPARE[trainer_cls]


class _TrainWithPrepare:
    """Replaces ``YOLO.train`` on one object so its trainer class runs ``prepare`` at the right place."""

    def __init__(self, yolo: Any):
        self.yolo = yolo
        self.train = yolo.train

    def __call__(self, trainer: type | None = None, **kwargs: Any) -> Any:
        return self.train(trainer=with_prepare(trainer or self.yolo._smart_load("trainer")), **kwargs)


def attach(yolo: Any, *methods: Method) -> CallbackHub:
    """Attach compression methods to a user's ``ultralytics.YOLO`` object before ``.train()``.

    Returns the hub; after training call ``hub.finalize(model)`` to get the deliverable model.
    """
    if not methods:
        raise UserError("attach() needs at least one method, e.g. attach(model, BNSlimming(s=1e-4))")
    hub = CallbackHub(methods)
    for event, fn in hub.callbacks().items():
        yolo.add_callback(event, fn)
    if not isinstance(yolo.__dict__.get("train"), _TrainWithPrepare):
        yolo.__dict__["train"] = _TrainWithPrepare(yolo)
    return hub
