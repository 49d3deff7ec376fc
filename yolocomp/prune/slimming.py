"""BN-γ network slimming (Liu et al. 2017) as a training :class:`Method`.

Sparsity training adds the L1 subgradient ``s * sign(γ)`` to the BatchNorm scales of the prunable convs. It runs in
``before_step`` — inside ``optimizer.step`` after AMP unscaling, after gradient accumulation and DDP averaging, once
per real step — so the penalty is exact whatever the loss scale or accumulation. Each epoch logs how many γ are
small; at the end a histogram PNG is written next to the training results.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from yolocomp.errors import UserError
from yolocomp.methods import Method

THRESHOLDS = (1e-3, 1e-2, 1e-1)


def prunable_bn_names(model: nn.Module, ignore: tuple[int, ...] = ()) -> list[str]:
    """Names of the BatchNorm layers whose channels the pruner may remove (backbone + neck, ignore excluded)."""
    from yolocomp.integration import unwrap
    from yolocomp.prune.graph import build_graph

    graph = build_graph(unwrap(model), ignore)
    return sorted({f"{p}.bn" for s in graph.prunable_spaces() for p, _ in s.producers})


class BNSlimming(Method):
    """L1 sparsity on BN γ during training; ``finalize`` prunes by |γ| when a ratio or FLOPs target is given."""

    name = "bn"

    def __init__(self, s: float = 1e-4, schedule: str = "constant", ratio: float | None = None,
                 flops_reduction: float | None = None, min_channels: int = 8, round_to: int = 8,
                 ignore: tuple[int, ...] = (), imgsz: int = 640, final_factor: float = 0.0):
        if s < 0:
            raise UserError(f"sparsity strength s={s} must be >= 0 (e.g. 1e-4)")
        if schedule not in {"constant", "linear_decay"}:
            raise UserError(f"schedule '{schedule}' unknown; use constant or linear_decay")
        self.s, self.schedule, self.final_factor = s, schedule, final_factor
        self.ratio, self.flops_reduction = ratio, flops_reduction
        self.min_channels, self.round_to, self.ignore, self.imgsz = min_channels, round_to, tuple(ignore), imgsz
        self.bn_names: list[str] = []
        self.history: list[dict] = []
        self.summary: dict | None = None
        self._params: list[torch.Tensor] | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_params"] = None  # runtime tensors are rebuilt from names in the worker
        return state

    # --- training hooks ------------------------------------------------------------------------------------------------
    def attach(self, trainer: Any) -> None:
        self.bn_names = prunable_bn_names(trainer.model, self.ignore)
        if not self.bn_names:
            raise UserError("no prunable BatchNorm layers found; BN-γ slimming needs an unfused model with BatchNorm")
        self._params = None

    def strength(self, trainer: Any) -> float:
        """Current s: constant, or decaying linearly to ``final_factor * s`` over the run."""
        if self.schedule == "constant":
            return self.s
        epochs = max(int(getattr(trainer, "epochs", 1)), 1)
        progress = min(max(float(getattr(trainer, "epoch", 0)) / epochs, 0.0), 1.0)
        return self.s * (1.0 - (1.0 - self.final_factor) * progress)

    def gammas(self, model: nn.Module) -> list[torch.Tensor]:
        from yolocomp.integration import unwrap

        modules = dict(unwrap(model).named_modules())
        return [modules[n].weight for n in self.bn_names if n in modules]

    def before_step(self, trainer: Any) -> None:
        if self._params is None:
            self._params = self.gammas(trainer.model)
        s = self.strength(trainer)
        if s == 0:
            return
        with torch.no_grad():
            for g in self._params:
                if g.grad is not None:
                    g.grad.add_(torch.sign(g.detach()), alpha=s)

    def gamma_stats(self, model: nn.Module) -> dict:
        values = torch.cat([g.detach().abs().float().flatten().cpu() for g in self.gammas(model)])
        stats = {f"below_{t:g}": round(float((values < t).float().mean()), 4) for t in THRESHOLDS}
        stats.update(mean=round(float(values.mean()), 5), median=round(float(values.median()), 5), n=values.numel())
        return stats

    def on_epoch_end(self, trainer: Any) -> None:
        from ultralytics.utils import LOGGER

        stats = {"epoch": int(getattr(trainer, "epoch", len(self.history))), "s": self.strength(trainer),
                 **self.gamma_stats(trainer.model)}
        self.history.append(stats)
        LOGGER.info(f"BN-γ: {json.dumps(stats)}")

    def on_train_end(self, trainer: Any) -> None:
        save_dir = Path(getattr(trainer, "save_dir", "."))
        values = torch.cat([g.detach().abs().float().flatten().cpu() for g in self.gammas(trainer.model)])
        save_histogram(values, save_dir / "bn_gamma_hist.png", title=f"|γ| after sparsity training (s={self.s:g})")
        (save_dir / "bn_gamma_stats.json").write_text(json.dumps(self.history, indent=1))
        self._params = None

    def finalize(self, model: nn.Module) -> nn.Module:
        if self.ratio is None and self.flops_reduction is None:
            return model
        from yolocomp.prune.pruner import prune_model

        pruned, self.summary = prune_model(model, ratio=self.ratio, flops_reduction=self.flops_reduction, method="bn",
                                           min_channels=self.min_channels, round_to=self.round_to, ignore=self.ignore,
                                           imgsz=self.imgsz)
        return pruned

    def __repr__(self) -> str:
        return f"BNSlimming(s={self.s:g}, schedule={self.schedule!r})"


def save_histogram(values: torch.Tensor, path: Path, title: str) -> Path:
    """Histogram of importance values (log-spaced bins) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    v = values.numpy()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    lo = max(float(v[v > 0].min()) if (v > 0).any() else 1e-6, 1e-6)
    bins = np.logspace(np.log10(lo), np.log10(max(float(v.max()), lo * 10)), 60)
    ax.hist(np.clip(v, lo, None), bins=bins)
    ax.set_xscale("log")
    ax.set_xlabel("value")
    ax.set_ylabel("channels")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
