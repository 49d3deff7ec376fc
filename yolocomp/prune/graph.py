"""Channel dependency graph of an Ultralytics detection model, built from its layer structure.

Torch-Pruning's tracer fails on C2f's ``chunk`` and finds nothing to prune in YOLOv5u's C3, so the dependencies are
derived here from the known block types instead. The vocabulary:

* a **space** is a set of channels that must be pruned with the same indices everywhere it appears (one conv's
  output, or several outputs tied by residual adds, or one half of C2f's ``cv1``);
* a **layout** is how a feature map's channels are made of spaces (a Concat joins layouts);
* a **family** is a set of spaces whose *counts* are tied through one yaml width parameter, e.g. every hidden space of
  one C2f has ``int(c2 * e)`` channels, C3k2's inner bottleneck has ``int(c * 0.5)``; members carry that factor;
* a :class:`ConvRec` says, for every conv whose shape can change, which layout feeds it and which it produces, so the
  surgery can slice its weight and BatchNorm.

Only the block types below are understood; anything else raises a :class:`UserError` naming the layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from yolocomp.errors import UserError

Layout = list[int]  # space ids, in channel order


@dataclass
class Space:
    id: int
    size: int
    layer: int  #: model.model index that creates it
    name: str  #: human label, e.g. "model.2.cv1[0]"
    producers: list[tuple[str, int]] = field(default_factory=list)  #: (Conv module name, channel offset)
    family: int = -1
    pinned: bool = False  #: keep every channel
    is_layer_output: bool = False  #: its count is a yaml c2 (must stay a multiple of 8 for make_divisible)


@dataclass
class Family:
    id: int
    members: list[tuple[int, float]]  #: (space id, factor): count = int(base * factor)
    base_size: int
    lo: int = 0  #: smallest allowed base count (e.g. Detect's hidden widths depend on its first input)
    layer_output: bool = False


@dataclass
class ConvRec:
    name: str  #: name of the Conv (ultralytics Conv wrapper with .conv/.bn) or of a bare nn.Conv2d
    in_layout: Layout | None  #: None: input channels never change
    out_layout: Layout | None  #: None: output channels never change
    depthwise: bool = False
    bare: bool = False  #: an nn.Conv2d without BatchNorm


@dataclass
class ChannelGraph:
    spaces: list[Space]
    families: list[Family]
    convs: list[ConvRec]
    layer_layouts: list[Layout]
    detect_index: int
    layer_types: list[str]

    def prunable_spaces(self) -> list[Space]:
        return [s for s in self.spaces if not s.pinned]

    def producers_of_layer(self, i: int) -> list[str]:
        return sorted({p for s in self.spaces if s.layer == i for p, _ in s.producers})


class _Builder:
    def __init__(self, model: nn.Module, ignore: set[int], as_c3k2: set[int]):
        self.model = model
        self.ignore = ignore
        self.as_c3k2 = as_c3k2
        self.spaces: list[Space] = []
        self.families: list[Family] = []
        self.convs: list[ConvRec] = []
        self.layer = 0

    # --- primitives -------------------------------------------------------------------------------------------------
    def family(self, base_size: int, layer_output: bool = False) -> Family:
        fam = Family(len(self.families), [], base_size, layer_output=layer_output)
        self.families.append(fam)
        return fam

    def space(self, size: int, name: str, fam: Family, factor: float = 1.0, layer_output: bool = False) -> int:
        # a C2f read as C3k2 keeps its full hidden space; the factor halves only its count
        if int(fam.base_size * factor) != size and self.layer not in self.as_c3k2:
            raise AssertionError(f"{name}: size {size} != int({fam.base_size} * {factor})")
        sp = Space(len(self.spaces), size, self.layer, name, family=fam.id, is_layer_output=layer_output)
        sp.pinned = self.layer in self.ignore
        self.spaces.append(sp)
        fam.members.append((sp.id, factor))
        return sp.id

    def size(self, layout: Layout) -> int:
        return sum(self.spaces[s].size for s in layout)

    def pin(self, layout: Layout) -> None:
        for s in layout:
            self.spaces[s].pinned = True

    def conv(self, name: str, module: nn.Module, in_layout: Layout | None, out_layout: Layout | None) -> None:
        """Record a ultralytics Conv (conv + bn + act) and register it as producer of its output spaces."""
        conv = module.conv
        if not hasattr(module, "bn"):
            raise UserError(f"{name} has no BatchNorm (model was fused); prune the unfused training checkpoint")
        if in_layout is not None and self.size(in_layout) != conv.in_channels:
            raise AssertionError(f"{name}: in layout {self.size(in_layout)} != {conv.in_channels}")
        depthwise = conv.groups > 1
        if depthwise and not (conv.groups == conv.in_channels == conv.out_channels):
            if in_layout:
                self.pin(in_layout)
            if out_layout:
                self.pin(out_layout)
        self.convs.append(ConvRec(name, in_layout, out_layout, depthwise=depthwise))
        if out_layout is not None and not depthwise:
            offset = 0
            for s in out_layout:
                self.spaces[s].producers.append((name, offset))
                offset += self.spaces[s].size

    # --- blocks -------------------------------------------------------------------------------------------------------
    def bottleneck(self, name: str, m: nn.Module, inp: int, fam: Family, factor: float, e: float) -> int:
        """Bottleneck(c, c, shortcut, e): hidden int(c*e); output tied to input when it adds the shortcut."""
        hidden = self.space(m.cv1.conv.out_channels, f"{name}.cv1", fam, factor * e)
        self.conv(f"{name}.cv1", m.cv1, [inp], [hidden])
        if m.add:
            out = inp
        else:
            out = self.space(m.cv2.conv.out_channels, f"{name}.cv2", fam, factor)
        self.conv(f"{name}.cv2", m.cv2, [hidden], [out])
        return out

    def c3(self, name: str, m: nn.Module, inp: Layout, fam: Family, factor: float, out: int) -> None:
        """C3 / C3k: cv1 -> bottleneck chain, cv2 beside it, cv3 joins (chain, cv2)."""
        a = self.space(m.cv1.conv.out_channels, f"{name}.cv1", fam, factor)
        b = self.space(m.cv2.conv.out_channels, f"{name}.cv2", fam, factor)
        self.conv(f"{name}.cv1", m.cv1, inp, [a])
        self.conv(f"{name}.cv2", m.cv2, inp, [b])
        y = a
        for j, blk in enumerate(m.m):
            y = self.bottleneck(f"{name}.m.{j}", blk, y, fam, factor, 1.0)
        self.conv(f"{name}.cv3", m.cv3, [y, b], [out])

    def c2f(self, name: str, m: nn.Module, inp: Layout, out: int, c3k2: bool) -> None:
        from ultralytics.nn.modules.block import Bottleneck, C3k

        fam = self.family(m.c)
        h0 = self.space(m.c, f"{name}.cv1[0]", fam)
        h1 = self.space(m.c, f"{name}.cv1[1]", fam)
        self.conv(f"{name}.cv1", m.cv1, inp, [h0, h1])
        ys = [h0, h1]
        for j, blk in enumerate(m.m):
            bname = f"{name}.m.{j}"
            if type(blk) is Bottleneck:
                ys.append(self.bottleneck(bname, blk, ys[-1], fam, 1.0, 0.5 if c3k2 else 1.0))
            elif type(blk) is C3k:
                o = self.space(blk.cv3.conv.out_channels, f"{bname}.cv3", fam)
                self.c3(bname, blk, [ys[-1]], fam, 0.5, o)
                ys.append(o)
            else:
                raise UserError(f"layer {self.layer} ({type(m).__name__}) holds {type(blk).__name__}, which the "
                                f"pruner does not support; pass ignore=[{self.layer}]")
        self.conv(f"{name}.cv2", m.cv2, ys, [out])

    def layer_out(self, size: int, name: str) -> int:
        fam = self.family(size, layer_output=True)
        return self.space(size, name, fam, layer_output=True)

    # --- the walk -----------------------------------------------------------------------------------------------------
    def build(self) -> ChannelGraph:
        from ultralytics.nn.modules import C2PSA, C3, SPPF, C2f, C3k2, Concat, Conv, Detect

        layers = self.model.model
        image = self.layer_out(3, "images")
        self.spaces[image].pinned = True
        outs: list[Layout] = []
        self._outs = outs
        types: list[str] = []
        detect_index = len(layers) - 1
        for i, m in enumerate(layers):
            self.layer = i
            name = f"model.{i}"
            f = m.f
            if isinstance(f, int):
                inp = [image] if i == 0 else outs[f] if f != -1 else outs[i - 1]
            else:
                inp = [s for j in f for s in (outs[i - 1] if j == -1 else outs[j])]
            t = type(m)
            if i in self.as_c3k2:
                self._check_convertible(i, m)
            types.append("C3k2" if i in self.as_c3k2 else t.__name__)
            if t is Conv or (t.__name__ == "DWConv" and isinstance(m, Conv)):
                if m.conv.groups > 1 and m.conv.groups == m.conv.in_channels == m.conv.out_channels:
                    self.conv(name, m, inp, inp)
                    out = inp
                else:
                    o = self.layer_out(m.conv.out_channels, name)
                    self.conv(name, m, inp, [o])
                    out = [o]
            elif t in (C2f, C3k2):
                o = self.layer_out(m.cv2.conv.out_channels, name)
                self.c2f(name, m, inp, o, c3k2=t is C3k2 or i in self.as_c3k2)
                out = [o]
            elif t is C3:
                o = self.layer_out(m.cv3.conv.out_channels, name)
                fam = self.family(m.cv1.conv.out_channels)
                self.c3(name, m, inp, fam, 1.0, o)
                out = [o]
            elif t is SPPF:
                out = [self.sppf(name, m, inp)]
            elif t is C2PSA:
                # C2PSA needs c1 == c2 and attention heads sized from c: keep it, its input and output whole.
                self.pin(inp)
                o = self.layer_out(m.cv2.conv.out_channels, name)
                self.spaces[o].pinned = True
                out = [o]
            elif t is Concat:
                if m.d != 1:
                    raise UserError(f"layer {i}: Concat over dim {m.d} is not supported by the pruner")
                out = inp
            elif t is nn.Upsample:
                out = inp
            elif t is Detect and type(m).__name__ == "Detect":
                self.detect(name, m, f)
                detect_index = i
                out = []
            else:
                raise UserError(f"layer {i} ({t.__name__}) is not supported by the pruner (supported: Conv, C2f, C3, "
                                "C3k2, SPPF, C2PSA, Concat, Upsample, Detect)")
            outs.append(out)
        if detect_index != len(layers) - 1:
            raise UserError("the pruner needs the Detect head as the model's last layer")
        # A family is as pinned as its most pinned member: counts are tied.
        for fam in self.families:
            if any(self.spaces[s].pinned for s, _ in fam.members):
                for s, _ in fam.members:
                    self.spaces[s].pinned = True
        return ChannelGraph(self.spaces, self.families, self.convs, outs, detect_index, types)

    def _check_convertible(self, i: int, m: nn.Module) -> None:
        from ultralytics.nn.modules import C2f
        from ultralytics.nn.modules.block import Bottleneck

        if type(m) is not C2f or not all(type(b) is Bottleneck for b in m.m):
            raise UserError(f"layer {i} is {type(m).__name__}, not a C2f of Bottlenecks; only such a block becomes C3k2")
        if i in self.ignore:
            raise UserError(f"layer {i} is in ignore, so its bottleneck cannot be halved to make it a C3k2")

    def sppf(self, name: str, m: nn.Module, inp: Layout) -> int:
        o = self.layer_out(m.cv2.conv.out_channels, name)
        src = self.spaces[inp[0]]
        src_fam = self.families[src.family]
        factor = dict(src_fam.members)[src.id]
        if len(inp) == 1 and factor == 1.0 and not getattr(m, "add", False):
            # hidden = c1 // 2 follows the input's count: same family, factor 0.5.
            h = self.space(m.cv1.conv.out_channels, f"{name}.cv1", src_fam, 0.5)
        else:
            self.pin(inp)
            h = self.space(m.cv1.conv.out_channels, f"{name}.cv1", self.family(m.cv1.conv.out_channels))
            self.spaces[h].pinned = True
            if getattr(m, "add", False):
                self.spaces[o].pinned = True
        self.conv(f"{name}.cv1", m.cv1, inp, [h])
        self.conv(f"{name}.cv2", m.cv2, [h] * (getattr(m, "n", 3) + 1), [o])
        return o

    def detect(self, name: str, m: nn.Module, f: list[int]) -> None:
        from ultralytics.nn.modules import Conv

        layouts = [self._outs[j] for j in f]
        heads = [("cv2", m.cv2), ("cv3", m.cv3)]
        if getattr(m, "one2one_cv2", None) is not None:
            heads += [("one2one_cv2", m.one2one_cv2), ("one2one_cv3", m.one2one_cv3)]
        for hname, branches in heads:
            if branches is None:
                continue
            for k, branch in enumerate(branches):
                first = branch[0]
                prefix = f"{name}.{hname}.{k}.0"
                if isinstance(first, Conv):
                    self.conv(prefix, first, layouts[k], None)
                else:  # YOLO11 head: Sequential(DWConv(x, x, 3), Conv(x, c3, 1))
                    self.conv(f"{prefix}.0", first[0], layouts[k], layouts[k])
                    self.conv(f"{prefix}.1", first[1], layouts[k], None)
        # Detect sizes its hidden convs from ch[0]; allow only counts of the first input that keep them.
        ch0 = layouts[0]
        if len(ch0) != 1:
            self.pin(ch0)
            return
        fam = self.families[self.spaces[ch0[0]].family]
        orig = self.spaces[ch0[0]].size

        def widths(c: int) -> tuple[int, int]:
            return max(16, c // 4, m.reg_max * 4), max(c, min(m.nc, 100))

        lo = orig
        while lo > 1 and widths(lo - 1) == widths(orig):
            lo -= 1
        fam.lo = max(fam.lo, lo)


def build_graph(model: nn.Module, ignore: tuple[int, ...] | list[int] = (),
                as_c3k2: tuple[int, ...] | list[int] = ()) -> ChannelGraph:
    """Trace the channel spaces of an Ultralytics DetectionModel (backbone + neck prunable, Detect outputs fixed).

    ``as_c3k2``: C2f layers to treat as C3k2, whose bottlenecks keep half their hidden channels (the surgery then
    writes them as C3k2, which is what makes Ultralytics build the YOLO11 class branch of Detect)."""
    return _Builder(model, set(ignore), set(as_c3k2)).build()
