"""Integration with Ultralytics: callbacks, the CLI trainer, checkpoint and data I/O."""

from yolocomp.integration.ultralytics import (
    CallbackHub,
    CompressionTrainer,
    attach,
    load_model,
    mirror_dataset,
    resolve_data,
    save_model,
    train,
)

__all__ = ["CallbackHub", "CompressionTrainer", "attach", "load_model", "mirror_dataset", "resolve_data", "save_model", "train"]
