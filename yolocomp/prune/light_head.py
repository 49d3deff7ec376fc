"""``light_head``: give a YOLOv8-style detector YOLO11's depthwise class branch, a model that stock Ultralytics rebuilds.

Detect's hidden widths come from ``nc`` and its first input, never from the yaml, so pruning cannot shrink the head;
on YOLOv8n at 320 px it holds two fifths of the FLOPs and its class branch (two 3x3 convs) most of them. Ultralytics
builds the cheaper YOLO11 class branch (depthwise 3x3 + pointwise, twice) whenever the yaml holds a C3k2 block, so
the conversion turns one C2f into a C3k2 (its bottlenecks keep the more important half of their hidden channels,
which is what C3k2's bottleneck width is) and rebuilds the model from the yaml. Every other tensor is copied, the
box branch too unless ``box_bins`` narrows it (a ``reg_max`` the yaml sets; it starts from the old branch's kept
slice). The new class branch starts from Ultralytics' initialisation and must be fitted to the teacher (block
reconstruction, then distillation), so the converted model is a starting point, not a finished one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from yolocomp.errors import UserError
from yolocomp.prune import importance as imp


def has_light_head(model: nn.Module) -> bool:
    """Whether the model's Detect class branch is YOLO11's depthwise one (not two 3x3 convs)."""
    head = model.model[-1]
    return isinstance(head.cv3[0][0], nn.Sequential)


def convertible_layers(model: nn.Module) -> list[int]:
    """C2f layers made of plain Bottlenecks: the blocks that can become a C3k2."""
    from ultralytics.nn.modules import C2f
    from ultralytics.nn.modules.block import Bottleneck

    return [i for i, m in enumerate(model.model) if type(m) is C2f and all(type(b) is Bottleneck for b in m.m)]


def _dropped_share(scores: dict[str, torch.Tensor], layer: int, model: nn.Module) -> float:
    """Share of the importance of ``layer``'s bottleneck hidden channels that halving them removes."""
    dropped = total = 0.0
    for j, _ in enumerate(model.model[layer].m):
        s = scores[f"model.{layer}.m.{j}.cv1"].float().sort().values
        dropped += float(s[: len(s) - len(s) // 2].sum())
        total += float(s.sum())
    return dropped / max(total, 1e-12)


def light_head(model: nn.Module, importance: str | Any = "bn", layer: int | None = None,
               imgsz: int = 640, ignore: tuple[int, ...] = (), box_bins: int | None = None) -> tuple[nn.Module, dict]:
    """A copy of ``model`` with YOLO11's depthwise class branch (freshly initialised) and ``layer`` (default: the C2f
    outside ``ignore`` whose halving drops the least importance) as a C3k2; returns ``(model, summary)``.
    ``importance`` ranks the bottleneck channels: a method name (``bn``, ``l1``, ``random``), a callable or ready
    scores, as for pruning. ``box_bins``: also give Detect this smaller ``reg_max`` (its box branch narrows to
    ``max(16, c / 4, 4 * box_bins)``), the branch started from the kept slice of the old one (:func:`shrink_box_branch`)."""
    from yolocomp.eval.info import gflops
    from yolocomp.prune import compensate as comp
    from yolocomp.prune.graph import build_graph
    from yolocomp.prune.plan import Planner, conv_costs
    from yolocomp.prune.pruner import check_model
    from yolocomp.prune.surgery import build_pruned

    check_model(model)
    if has_light_head(model):
        raise UserError("the model's Detect already has YOLO11's depthwise class branch; drop --head light")
    candidates = [i for i in convertible_layers(model) if i not in ignore]
    if not candidates:
        raise UserError("--head light needs a C2f block to turn into the C3k2 that makes Ultralytics build the light "
                        "head; this model has none (use --head keep)")
    if layer is not None and layer not in candidates:
        raise UserError(f"layer {layer} is not a C2f of Bottlenecks outside ignore; pick one of {candidates}")
    names = [f"model.{i}.m.{j}.cv1" for i in candidates for j, _ in enumerate(model.model[i].m)]
    scores = imp.compute(model, names, importance)
    if layer is None:
        layer = min(candidates, key=lambda i: _dropped_share(scores, i, model))
    graph = build_graph(model, ignore, as_c3k2=[layer])
    producers = sorted({p for s in graph.prunable_spaces() for p, _ in s.producers})
    plan = Planner(graph, imp.compute(model, producers, importance), conv_costs(model, imgsz)).plan_for(0)  # nothing cut but the halved bottleneck
    d = graph.detect_index
    reg_max = int(model.model[-1].reg_max)
    if box_bins is not None and not 2 <= box_bins <= reg_max:
        raise UserError(f"box_bins={box_bins} must be from 2 to the head's reg_max {reg_max}; use e.g. {reg_max // 2}, "
                        f"or {reg_max} to keep the box branch")
    box_bins = None if box_bins == reg_max else box_bins
    fresh = (f"model.{d}.cv3.",) + ((f"model.{d}.cv2.", f"model.{d}.dfl.") if box_bins else ())
    converted = build_pruned(model, graph, plan, fresh=fresh, yaml_overrides={"reg_max": box_bins} if box_bins else None)
    comp.compensate(model, converted, graph, plan, comp.analytic_means(model, graph))
    if not has_light_head(converted):
        raise AssertionError("Ultralytics did not build the light class branch from the C3k2 yaml")
    summary = {"c3k2_layer": layer}
    if box_bins:
        summary["box_branch"] = shrink_box_branch(model, converted, importance)
    summary["gflops"] = {"before": round(gflops(model, imgsz), 4), "after": round(gflops(converted, imgsz), 4)}
    return converted, summary


def auto_box_bins(model: nn.Module, imgsz: int, bins: int) -> int | None:
    """``bins`` when the model's Detect has more and ``bins - 1`` strides of its coarsest level reach half of an
    ``imgsz`` image (so every box can still be drawn from the anchor at its centre), else None (keep the box branch)."""
    head = model.model[-1]
    reach = (bins - 1) * float(max(head.stride))
    return bins if int(head.reg_max) > bins and 2 * reach >= imgsz else None


@torch.no_grad()
def shrink_box_branch(source: nn.Module, converted: nn.Module, importance: str | Any = "bn") -> dict:
    """Start ``converted``'s narrower box branch (fewer DFL bins) from ``source``'s: each hidden conv keeps its most
    important output channels, and the last conv the rows of every side's first bins. Returns the widths."""
    old, new = source.model[-1], converted.model[-1]
    r_old, r_new = int(old.reg_max), int(new.reg_max)
    rows = torch.tensor([side * r_old + k for side in range(4) for k in range(r_new)])
    d = len(source.model) - 1
    widths = []
    for level, (branch, target) in enumerate(zip(old.cv2, new.cv2)):
        names = [f"model.{d}.cv2.{level}.{j}" for j in (0, 1)]
        scores = imp.compute(source, names, importance)
        keep_in = None
        for name, conv, dst in zip(names, branch[:2], target[:2]):
            keep = scores[name].argsort(descending=True)[: dst.conv.out_channels].sort().values
            weight = conv.conv.weight[keep]
            dst.conv.weight.copy_(weight if keep_in is None else weight[:, keep_in])
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(dst.bn, key).copy_(getattr(conv.bn, key)[keep])
            keep_in = keep
        target[2].weight.copy_(branch[2].weight[rows][:, keep_in])
        target[2].bias.copy_(branch[2].bias[rows])
        widths.append([branch[0].conv.out_channels, target[0].conv.out_channels])
    return {"reg_max": {"before": r_old, "after": r_new}, "hidden": widths}


@torch.no_grad()
def settle_batchnorm(model: nn.Module, prefix: str | tuple[str, ...], images: torch.Tensor, batch_size: int = 8) -> int:
    """Give the BatchNorms under ``prefix`` (one or several) the running statistics of their inputs on ``images`` and rescale their
    affine so the model computes exactly what it did; returns how many were settled.

    A branch fitted from scratch in eval mode keeps its initial statistics (mean 0, variance 1), so training it later
    with batch statistics (Ultralytics' default) would change its output at the first step."""
    bns = {name: m for name, m in model.named_modules() if name.startswith(prefix) and isinstance(m, nn.BatchNorm2d)}
    sums: dict[str, list[torch.Tensor | float]] = {}

    def hook_for(name: str):
        def hook(_m, args):
            x = args[0].double().transpose(0, 1).flatten(1)
            s = sums.setdefault(name, [0.0, 0.0, 0])
            s[0], s[1], s[2] = s[0] + x.sum(1), s[1] + x.pow(2).sum(1), s[2] + x.shape[1]
        return hook

    hooks = [m.register_forward_pre_hook(hook_for(name)) for name, m in bns.items()]
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for b in images.split(batch_size):
            model(b.to(device).float())
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    for name, bn in bns.items():
        total, squares, n = sums[name]
        mean = total / n
        var = (squares / n - mean.pow(2)).clamp_min(0)
        old_std = (bn.running_var.double() + bn.eps).sqrt()
        new_std = (var + bn.eps).sqrt()
        gamma, beta = bn.weight.double(), bn.bias.double()
        bn.bias.copy_(beta + gamma * (mean - bn.running_mean.double()) / old_std)
        bn.weight.copy_(gamma * new_std / old_std)
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
    return len(bns)
