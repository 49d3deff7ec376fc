"""Build the pruned model: write a per-layer yaml that rebuilds exactly the pruned widths, build a stock
``DetectionModel`` from it and copy the kept slice of every tensor.

``YOLO(path).train()`` rebuilds a checkpoint's model from ``model.yaml`` and silently drops weights whose shapes do
not match, so the yaml must describe the pruned architecture itself: no scales (width and depth 1.0), explicit
channels and repeats per layer, and for C2f / C3 / C3k2 an expansion ``e`` chosen so ``int(c2 * e)`` is the kept
hidden width. Building the model from that yaml (instead of editing modules in place) guarantees both agree.
"""

from __future__ import annotations

from copy import deepcopy

import torch
from torch import nn

from yolocomp.prune.graph import ChannelGraph
from yolocomp.prune.plan import Plan


def _e(hidden: int, c2: int) -> float:
    # int(c2 * e) must give `hidden` exactly; +0.5 keeps float rounding from flooring one below.
    return round((hidden + 0.5) / c2, 8)


def pruned_yaml(model: nn.Module, graph: ChannelGraph, plan: Plan) -> dict:
    """The model yaml of the pruned architecture (only stock Ultralytics module names)."""
    from ultralytics.nn.modules import C2PSA, C3, SPPF, C2f, C3k2, Conv
    from ultralytics.nn.modules.block import C3k

    src = deepcopy(model.yaml)
    rows = src["backbone"] + src["head"]
    n_backbone = len(src["backbone"])
    by_name = {s.name: s.id for s in graph.spaces}

    def count(name: str) -> int:
        return plan.counts[by_name[name]]

    new_rows = []
    for i, (row, m) in enumerate(zip(rows, model.model)):
        f, n, mod, args = row
        args = list(args)
        t = type(m)
        if t is Conv and f"model.{i}" in by_name:
            row = [f, 1, mod, [count(f"model.{i}"), *args[1:]]]
        elif t in (C2f, C3k2, C3):
            c2 = count(f"model.{i}")
            first = m.m[0]
            inner = first.m[0] if isinstance(first, C3k) else first
            shortcut, g = bool(inner.add), inner.cv2.conv.groups
            if t is C3:
                row = [f, len(m.m), mod, [c2, shortcut, g, _e(count(f"model.{i}.cv1"), c2)]]
            else:
                e = _e(count(f"model.{i}.cv1[0]"), c2)
                if t is C2f and graph.layer_types[i] == "C2f":
                    row = [f, len(m.m), mod, [c2, shortcut, g, e]]
                else:  # C3k2, or a C2f whose bottlenecks were halved into one
                    row = [f, len(m.m), "C3k2", [c2, isinstance(first, C3k), e, False, g, shortcut]]
        elif t is SPPF:
            row = [f, 1, mod, [count(f"model.{i}"), *args[1:]]]
        elif t is C2PSA:
            row = [f, len(m.m), mod, [m.cv2.conv.out_channels, *args[1:]]]
        new_rows.append(row)
    out = {k: v for k, v in src.items() if k not in {"scales", "scale", "backbone", "head"}}
    out.update(depth_multiple=1.0, width_multiple=1.0)
    out["backbone"], out["head"] = new_rows[:n_backbone], new_rows[n_backbone:]
    stem = str(src.get("yaml_file", "model.yaml")).rsplit("/", 1)[-1].removesuffix(".yaml")
    out["yaml_file"] = f"{stem.removesuffix('-pruned')}-pruned.yaml"
    return out


def _index(layout: list[int] | None, graph: ChannelGraph, plan: Plan) -> torch.Tensor | None:
    if layout is None:
        return None
    parts, offset = [], 0
    for sid in layout:
        parts.append(plan.keep[sid] + offset)
        offset += graph.spaces[sid].size
    return torch.cat(parts).long()


def layer_keep(graph: ChannelGraph, plan: Plan) -> dict[int, list[int]]:
    """Per layer index whose output channels change: the kept output channel indices (into the original layer's)."""
    out = {}
    for i, layout in enumerate(graph.layer_layouts):
        if layout and any(plan.counts[s] != graph.spaces[s].size for s in layout):
            out[i] = _index(layout, graph, plan).tolist()
    return out


def slices(graph: ChannelGraph, plan: Plan) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None, bool]]:
    """state_dict key -> (kept output index, kept input index, depthwise) for every tensor whose shape changes."""
    out = {}
    for rec in graph.convs:
        o, i = _index(rec.out_layout, graph, plan), _index(rec.in_layout, graph, plan)
        conv = rec.name if rec.bare else f"{rec.name}.conv"
        out[f"{conv}.weight"] = (o, i, rec.depthwise)
        out[f"{conv}.bias"] = (o, None, False)
        if not rec.bare:
            for key in ("weight", "bias", "running_mean", "running_var"):
                out[f"{rec.name}.bn.{key}"] = (o, None, False)
    return out


def build_pruned(model: nn.Module, graph: ChannelGraph, plan: Plan, fresh: str | tuple[str, ...] | None = None,
                 yaml_overrides: dict | None = None, seed: int = 0) -> nn.Module:
    """A new DetectionModel with the plan's widths and the kept slices of ``model``'s weights.

    ``fresh``: state_dict prefixes whose tensors keep the new model's initialisation (a rebuilt head branch), drawn
    from ``seed`` so that two runs start the same (the caller's random state is left as it was);
    ``yaml_overrides``: top-level yaml keys to set (e.g. the head's ``reg_max``)."""
    from ultralytics.nn.tasks import DetectionModel

    cfg = {**pruned_yaml(model, graph, plan), **(yaml_overrides or {})}
    p = next(model.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        new = DetectionModel(deepcopy(cfg), ch=cfg.get("channels", 3), nc=model.yaml.get("nc"), verbose=False)
    new.yaml = cfg
    cut = slices(graph, plan)
    old_state = model.state_dict()
    new_state = new.state_dict()
    for key, target in new_state.items():
        if fresh is not None and key.startswith(fresh):
            continue
        if key not in old_state:
            raise AssertionError(f"pruned model has {key} that the original lacks")
        value = old_state[key]
        if key in cut:
            o, i, depthwise = cut[key]
            if o is not None and value.ndim >= 1:
                value = value.index_select(0, o.to(value.device))
            if i is not None and not depthwise and value.ndim >= 2:
                value = value.index_select(1, i.to(value.device))
        if value.shape != target.shape:
            raise AssertionError(f"{key}: sliced shape {tuple(value.shape)} != rebuilt {tuple(target.shape)}")
        target.copy_(value)
    for attr in ("names", "args", "pt_path", "task"):
        if hasattr(model, attr):
            setattr(new, attr, deepcopy(getattr(model, attr)))
    # Keep BN hyper-parameters (Ultralytics sets eps/momentum at build; a checkpoint may differ).
    old_bns = dict(model.named_modules())
    for name, mod in new.named_modules():
        if isinstance(mod, nn.BatchNorm2d) and isinstance(old_bns.get(name), nn.BatchNorm2d):
            mod.eps, mod.momentum = old_bns[name].eps, old_bns[name].momentum
    new.train(model.training)
    return new.to(device=p.device, dtype=p.dtype)
