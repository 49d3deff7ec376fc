"""The ``train`` stage of a recipe: plain Ultralytics training (the demo's base model, or a warm-up)."""

from __future__ import annotations

from pathlib import Path

from yolocomp.commands.common import StageResult, load_recipe_model, require_data, with_model
from yolocomp.recipe import Recipe


def run_stage(recipe: Recipe, model: str, out: Path, data: Path | None, reference: str | None,
              evaluate: bool = True) -> StageResult:
    from yolocomp.integration import save_model, train

    require_data(data, "stage train")
    cfg = recipe.stage("train")
    net = load_recipe_model(with_model(recipe, model), data)
    result = train(net, str(data), [], project=out, name="train", epochs=cfg.epochs, imgsz=recipe.imgsz,
                   device=recipe.device, **cfg.trainer_overrides())
    path = save_model(result.model, out / "model.pt")
    return StageResult("train", str(path), {"trained": str(path)}, {"metrics": result.metrics})
