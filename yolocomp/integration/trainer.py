"""The CLI's trainer: train an in-memory (pruned, quantized) model with methods attached, resume interrupted runs."""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from yolocomp.config.train import KEEP_CHOICES
from yolocomp.errors import UserError, first_line
from yolocomp.integration.hooks import _WITH_PREPARE, CallbackHub, PrepareBeforeOptimizer, as_training_model
from yolocomp.integration.threads import keep_threads
from yolocomp.methods import Method


def _detection_trainer_cls() -> type:
    from ultralytics.models.yolo.detect import DetectionTrainer

    return DetectionTrainer


class DetectionTrainerWithPrepare(PrepareBeforeOptimizer, _detection_trainer_cls()):
    """Ultralytics' DetectionTrainer with methods' ``prepare`` before the optimizer: what a user's ``YOLO(...).train()``
    runs after :func:`yolocomp.attach` (importable, so DDP workers unpickle it by reference)."""


_WITH_PREPARE[_detection_trainer_cls()] = DetectionTrainerWithPrepare


class CompressionTrainer(PrepareBeforeOptimizer, _detection_trainer_cls()):
    """DetectionTrainer that trains the model it is given (or resumes) as-is.

    Stock Ultralytics rebuilds the model from its yaml and copies matching weights, which would silently drop pruned
    shapes and quantizer modules. Here a module passed as weights (a checkpoint's EMA on resume) is used directly.
    Methods' ``prepare`` runs before the optimizer is built (:class:`PrepareBeforeOptimizer`).
    """

    #: how long the latest validation took (a deadline keeps room for the ones that close the run)
    validation_seconds: float | None = None

    def get_model(self, cfg: Any = None, weights: Any = None, verbose: bool = True) -> nn.Module:
        if isinstance(weights, nn.Module):
            return as_training_model(weights)
        return super().get_model(cfg=cfg, weights=weights, verbose=verbose)

    def validate(self) -> Any:
        started = time.time()
        try:
            return super().validate()
        finally:
            self.validation_seconds = time.time() - started


#: validations that still run once a timed training stops: the stopping epoch's and the final one of best.pt
CLOSING_VALIDATIONS = 2


def stop_before(deadline: float, validation_estimate: float = 0.0) -> Any:
    """An ``on_train_batch_end`` callback that stops training early enough for its closing validations to end by
    ``deadline`` (``time.time()`` seconds); their length is the trainer's latest validation, else ``validation_estimate``."""

    def check(trainer: Any) -> None:
        each = getattr(trainer, "validation_seconds", None) or validation_estimate
        if time.time() + CLOSING_VALIDATIONS * each >= deadline:
            trainer.stop = True

    return check


_RESUME_INTERRUPTED: contextvars.ContextVar[bool] = contextvars.ContextVar("yolocomp_resume_interrupted", default=False)


@contextlib.contextmanager
def resume_interrupted() -> Iterator[None]:
    """Within this block, :func:`train` resumes a run whose folder holds an unfinished checkpoint instead of starting
    over (used by ``yolocomp run`` so an interrupted stage continues from its last epoch)."""
    token = _RESUME_INTERRUPTED.set(True)
    try:
        yield
    finally:
        _RESUME_INTERRUPTED.reset(token)


def is_resumable(checkpoint: str | Path) -> bool:
    """An Ultralytics checkpoint of an unfinished run (finished runs have their optimizer stripped).

    An unreadable file is an error, not "start over": restarting would overwrite the run the user wants resumed."""
    try:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"cannot resume from {checkpoint}: unreadable checkpoint ({first_line(e)}); restore it, or delete "
                        f"it to restart that training from scratch") from None
    return isinstance(ckpt, dict) and ckpt.get("optimizer") is not None and ckpt.get("epoch", -1) >= 0


def _drop_rows_after_checkpoint(last: Path) -> None:
    """A kill between Ultralytics writing an epoch's results.csv row and its checkpoint leaves a row the resumed run
    writes again; keep only the rows up to the checkpoint's epoch so every epoch appears once."""
    epoch = torch.load(last, map_location="cpu", weights_only=False)["epoch"]  # 0-based, last finished epoch
    csv = last.parent.parent / "results.csv"
    if not csv.exists():
        return
    header, *rows = csv.read_text().splitlines()
    kept = [r for r in rows if r and float(r.split(",", 1)[0]) <= epoch + 1]
    if len(kept) != len(rows):
        csv.write_text("\n".join([header, *kept]) + "\n")


@dataclass
class TrainResult:
    model: nn.Module  #: the kept checkpoint's model (``keep``: last or best) after every method's ``finalize``
    save_dir: Path
    best: Path
    last: Path
    metrics: dict  #: Ultralytics' validation metrics of the kept checkpoint


def train(
    model: nn.Module | None,
    data: str,
    methods: Sequence[Method],
    project: str | Path,
    name: str,
    resume: str | Path | None = None,
    keep: str = "last",
    deadline: float | None = None,
    validation_estimate: float = 0.0,
    **overrides: Any,
) -> TrainResult:
    """Train ``model`` (or resume ``resume``) with ``methods`` attached, then finalize the kept checkpoint.

    ``keep="last"`` hands on the model where the budget ends; ``"best"`` the one Ultralytics picks by its fitness on
    the data yaml's val split, which selects on the images a report may then evaluate on. ``deadline``
    (``time.time()`` seconds) ends the run, closing validations included (``validation_estimate`` seconds each until
    one has been timed): Ultralytics plans its epochs for the time left (``time``) and stops early enough."""
    from ultralytics.nn.tasks import load_checkpoint
    from ultralytics.utils import callbacks as ul_callbacks

    if keep not in KEEP_CHOICES:
        raise UserError(f"keep={keep!r} is not a checkpoint choice; use keep='last' or keep='best'")
    if resume is None and _RESUME_INTERRUPTED.get():
        last = Path(project) / name / "weights" / "last.pt"
        if last.exists() and is_resumable(last):
            resume = last
            _drop_rows_after_checkpoint(last)
    hub = CallbackHub(methods)
    cbs = ul_callbacks.get_default_callbacks()
    for event, fn in hub.callbacks().items():
        cbs[event].append(fn)
    # final_eval replaces trainer.metrics with best.pt's (and reruns on_fit_epoch_end), so note them as last.pt is saved
    last_epoch_metrics: dict = {}

    def remember_metrics(trainer: Any) -> None:
        last_epoch_metrics.clear()
        last_epoch_metrics.update(getattr(trainer, "metrics", None) or {})

    cbs["on_model_save"].append(remember_metrics)
    callers_threads = torch.get_num_threads()
    # the trainer's select_device has set cpu_count - 1 threads by now (one of two cores): train on the caller's
    cbs["on_train_start"].append(lambda trainer: torch.set_num_threads(callers_threads))
    if deadline is not None:
        overrides["time"] = max(deadline - time.time(), 1.0) / 3600  # a deadline already past still trains a batch
        cbs["on_train_batch_end"].append(stop_before(deadline, validation_estimate))
    args = {
        "data": data,
        "project": str(Path(project).resolve()),
        "name": name,
        "exist_ok": True,
        "device": "cpu",
        "workers": 0,
        "plots": False,
        "verbose": False,
        **overrides,
    }
    if model is None and resume is None:
        raise UserError("train() needs a model or a checkpoint to resume")
    with keep_threads():  # the trainer and the final validation of best.pt select the device (and threads) again
        if resume is not None:
            args = {"resume": str(resume), "model": str(resume), **{k: v for k, v in args.items() if k == "device"}}
            trainer = CompressionTrainer(overrides=args, _callbacks=cbs)
        else:
            args.setdefault("model", getattr(model, "pt_path", None) or "yolocomp.pt")
            trainer = CompressionTrainer(overrides=args, _callbacks=cbs)
            trainer.model = model
        trainer.train()
    kept = trainer.best if keep == "best" and trainer.best.exists() else trainer.last
    trained, _ = load_checkpoint(kept)
    return TrainResult(
        model=hub.finalize(trained),
        save_dir=Path(trainer.save_dir),
        best=Path(trainer.best),
        last=Path(trainer.last),
        metrics=dict(last_epoch_metrics if keep == "last" else getattr(trainer, "metrics", {}) or {}),
    )
