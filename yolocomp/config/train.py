"""Options every training stage shares, and the plain ``train`` stage (the demo's base model)."""

from __future__ import annotations

from dataclasses import dataclass

from yolocomp.config.options import non_negative, option, positive, valid_fraction

#: Training options handed to Ultralytics' trainer when set (unset ones leave the stage's or Ultralytics' default).
TRAINER_KEYS = ("batch", "fraction", "lr0", "workers", "optimizer")
#: the checkpoint a training stage hands on (``yolocomp.integration.train``'s ``keep``)
KEEP_CHOICES = ("last", "best")


@dataclass
class TrainingOptions:
    batch: int = option(16, "batch size", hint="use a batch size such as 16", check=positive)
    fraction: float = option(1.0, "share of the train set to use, e.g. 0.25", hint="use a share of the train set such as 0.25",
                             check=valid_fraction)
    lr0: float | None = option(None, "initial learning rate (unset: the stage's own default)",
                               hint="use a learning rate such as 0.001", check=positive)
    workers: int = option(0, "dataloader workers", hint="use a worker count such as 2", check=non_negative)
    optimizer: str | None = option(None, "Ultralytics optimizer (SGD, AdamW, auto; unset: the stage decides)",
                                   hint="use an Ultralytics optimizer name such as SGD")
    keep: str = option("last", "checkpoint a training stage hands on: last (where the budget ends) or best "
                       "(Ultralytics' pick by fitness on the data yaml's val split, so chosen on those images)",
                       hint="use last or best", choices=KEEP_CHOICES)
    trainer: dict = option({}, "more Ultralytics trainer arguments, e.g. {warmup_epochs: 0, mosaic: 0.0}", cli=False,
                           hint="use a mapping of Ultralytics train arguments such as {warmup_epochs: 0}")

    def trainer_overrides(self) -> dict:
        """The training options that are set, as arguments of ``yolocomp.integration.train`` (Ultralytics' trainer
        arguments plus ``keep``)."""
        return {**self.trainer, **{k: getattr(self, k) for k in TRAINER_KEYS if getattr(self, k) is not None},
                "keep": self.keep}


@dataclass
class TrainConfig(TrainingOptions):
    """Plain Ultralytics training (the demo's base model, or a warm-up before compression)."""

    epochs: int = option(10, "training epochs", hint="use a whole number of epochs such as 10", check=positive)
