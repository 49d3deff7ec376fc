"""Swap a detector's convolutions for quantized ones ("full": every conv, first layer and Detect's final box/class
convs included; only the DFL decode stays float) and share activation quantizers where TensorRT needs one scale."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from yolocomp.errors import UserError
from yolocomp.quant.modules import QBottleneck, QConv, quant_convs
from yolocomp.quant.quantizer import Quantizer

BitsSpec = int | tuple[int, int]


def _is_conv_bn_act(m: nn.Module) -> bool:
    # Ultralytics Conv / DWConv: act(bn(conv(x))); a fused one has no bn and a biased conv
    return type(m).__name__ in {"Conv", "DWConv"} and isinstance(getattr(m, "conv", None), nn.Conv2d)


def _excluded(name: str, patterns: Iterable[str | int]) -> bool:
    for p in patterns:
        p = str(p)
        if p.isdigit():
            p = f"model.{p}"
        if name == p or name.startswith(p + ".") or fnmatch.fnmatch(name, p):
            return True
    return False


def _bits_for(name: str, default: tuple[int, int], layer_bits: Mapping[str, BitsSpec] | None,
              edges: Iterable[str] = (), edge_bits: int | None = None) -> tuple[int, int]:
    for pattern, spec in (layer_bits or {}).items():
        if name == pattern or name.startswith(pattern + ".") or fnmatch.fnmatch(name, pattern):
            return (spec, spec) if isinstance(spec, int) else (int(spec[0]), int(spec[1]))
    if edge_bits is not None and name in edges:
        return max(default[0], edge_bits), max(default[1], edge_bits)
    return default


def edge_layers(model: nn.Module) -> list[str]:
    """The convs at the ends of the detector: the first conv (it reads the image) and the last conv of each Detect
    branch (box distributions, class logits, masks or keypoints: the outputs NMS reads)."""
    from ultralytics.nn.modules import Detect

    names = []
    for name, m in model.named_modules():
        if not names and (_is_conv_bn_act(m) or isinstance(m, nn.Conv2d)):
            names.append(name)
        if isinstance(m, Detect):
            for attr, branches in m.named_children():
                if isinstance(branches, nn.ModuleList):
                    names += [f"{name}.{attr}.{i}.{len(b) - 1}" for i, b in enumerate(branches)
                              if isinstance(b, nn.Sequential) and isinstance(b[-1], nn.Conv2d)]
    return names


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    for attr in ("f", "i", "type", "np"):  # Ultralytics' per-layer routing attributes
        if hasattr(old, attr):
            setattr(new, attr, getattr(old, attr))
    setattr(parent, child, new)


def validate_exclude(model: nn.Module, exclude: Iterable[str | int]) -> list[str]:
    """Check that every exclusion names at least one conv; return the matching conv names."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, QConv)) or _is_conv_bn_act(m)]
    hits = []
    for p in exclude:
        found = [n for n in names if _excluded(n, [p])]
        if not found:
            raise UserError(f"exclude {p!r} matches no conv layer; give a layer index (e.g. 22) or a module name "
                            f"such as {names[-2]!r}")
        hits += found
    return sorted(set(hits))


def quantize_model(model: nn.Module, w_bits: int = 8, a_bits: int = 8, exclude: Iterable[str | int] = (),
                   layer_bits: Mapping[str, BitsSpec] | None = None, share: bool = True,
                   edge_bits: int | None = None, act_offset: bool = True) -> dict:
    """Replace convs by :class:`QConv` in place (idempotent). Returns ``{"quantized": [...], "excluded": [...],
    "edge_layers": [...]}``. ``edge_bits``: at least this many bits (weights and activations) for the
    :func:`edge_layers` that ``layer_bits`` does not name, as BRECQ, QDrop and AdaRound report their 4-bit results.
    ``act_offset``: 8-bit activation quantizers may shift their grid at calibration (see
    :class:`~yolocomp.quant.quantizer.Quantizer`)."""
    exclude = list(exclude)
    if quant_convs(model):
        return {"quantized": [q.name for q in quant_convs(model)], "excluded": getattr(model, "quant_excluded", []),
                "changed": False}
    validate_exclude(model, exclude)
    edges = edge_layers(model) if edge_bits is not None else []
    quantized, excluded, raised = [], [], []
    targets = []
    for name, m in model.named_modules():
        if any(name.startswith(t + ".") for t, _ in targets):
            continue  # inside a Conv already taken whole
        if _is_conv_bn_act(m) or (isinstance(m, nn.Conv2d) and ".dfl" not in f".{name}"):
            targets.append((name, m))
    for name, m in targets:
        if _excluded(name, exclude):
            excluded.append(name)
            continue
        wb, ab = _bits_for(name, (w_bits, a_bits), layer_bits, edges, edge_bits)
        if name in edges and (wb, ab) != _bits_for(name, (w_bits, a_bits), layer_bits):
            raised.append(name)
        if isinstance(m, nn.Conv2d):
            q = QConv(m, None, nn.Identity(), wb, ab, name, act_offset)
        else:
            q = QConv(m.conv, getattr(m, "bn", None), m.act, wb, ab, name, act_offset)
        q.float_type = type(m).__name__
        _set(model, name, q)
        quantized.append(name)
    for name, m in list(model.named_modules()):
        if type(m).__name__ == "Bottleneck" and isinstance(getattr(m, "cv1", None), QConv):
            _set(model, name, QBottleneck(m.cv1, m.cv2, bool(m.add)))
    if share:
        share_quantizers(model)
    model.quant_excluded = excluded
    return {"quantized": quantized, "excluded": excluded, "edge_layers": raised, "changed": True}


# --- one scale per tensor group -------------------------------------------------------------------------------------
class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict = {}

    def find(self, a):
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a, b) -> None:
        self.parent[self.find(a)] = self.find(b)


def _key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()))


class _Recorder:
    """Forward hooks (objects, not lambdas) recording which tensors meet which quantizer / transparent op."""

    def __init__(self) -> None:
        self.uf = _UnionFind()
        self.keep: list[torch.Tensor] = []  # hold tensors so their memory is not reused during the trace
        self.users: list[tuple[tuple, Quantizer]] = []

    def quantizer_pre(self, module: Quantizer, args: tuple) -> None:
        x = args[0]
        self.keep.append(x)
        self.users.append((_key(x), module))

    def transparent(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        inputs = args[0] if isinstance(args[0], (list, tuple)) else [args[0]]
        self.keep += [*inputs, output]
        for t in inputs:
            self.uf.union(_key(t), _key(output))


def share_quantizers(model: nn.Module, imgsz: int = 64) -> int:
    """Make every activation quantizer that sees the same tensor, or tensors joined by Concat / Upsample / MaxPool
    (TensorRT moves Q across those), one shared module; also C2f's concat and its bottleneck inputs. Returns the number
    of quantizers removed."""
    rec = _Recorder()
    acts = [q.act_quant for q in quant_convs(model)]
    handles = [q.register_forward_pre_hook(rec.quantizer_pre) for q in {id(a): a for a in acts}.values()]
    for m in model.modules():
        if type(m).__name__ == "Concat" or isinstance(m, (nn.Upsample, nn.MaxPool2d)):
            handles.append(m.register_forward_hook(rec.transparent))
    was_training = model.training
    param = next(model.parameters())
    qs = [m for m in model.modules() if isinstance(m, Quantizer)]
    enabled = [q.enabled for q in qs]
    try:
        for q in qs:
            q.enabled = False  # the trace must not lazily initialise step sizes from a zero image
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, imgsz, imgsz, device=param.device, dtype=param.dtype))
    finally:
        for h in handles:
            h.remove()
        for q, e in zip(qs, enabled):
            q.enabled = e
        model.train(was_training)
    groups: dict = {}
    for key, q in rec.users:
        groups.setdefault(rec.uf.find(key), []).append(q)
    # C2f: the inputs of its bottlenecks are parts of the concat its cv2 quantizes
    for m in model.modules():
        if type(m).__name__ in {"C2f", "C3k2"} and isinstance(getattr(m, "cv2", None), QConv):
            inner = [b.cv1.act_quant for b in m.m if isinstance(b, QBottleneck)]
            if inner:
                groups[("c2f", id(m))] = [m.cv2.act_quant, *inner]
    # merge groups that share a quantizer (transitively)
    uf = _UnionFind()
    for members in groups.values():
        for q in members[1:]:
            uf.union(id(q), id(members[0]))
    by_id = {id(q): q for members in groups.values() for q in members}
    canonical: dict[int, Quantizer] = {}
    for qid, q in by_id.items():
        root = uf.find(qid)
        if root not in canonical or q.bits > canonical[root].bits:  # mixed bits: the finer grid wins
            canonical[root] = q
    removed = 0
    for conv in quant_convs(model):
        target = canonical.get(uf.find(id(conv.act_quant)))
        if target is not None and target is not conv.act_quant:
            conv.act_quant = target
            removed += 1
    return removed
