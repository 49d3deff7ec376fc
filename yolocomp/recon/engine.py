"""``reconstruct``: fit each block of a compressed student so its output matches the teacher's block output.

Block ``i`` is fitted on the outputs of the student's already reconstructed blocks (BRECQ: the errors of earlier
blocks are what later blocks must absorb), against the teacher's output of the same block computed on the teacher's
own inputs. A pruned block outputs a subset of the teacher's channels: ``channel_map[i]`` lists the kept ones
(``prune_model``'s ``summary["kept_channels"]``, ``progressive_prune``'s history); layers absent from it keep all.

BatchNorm stays in eval mode: conv weights and BN affine are fitted against fixed running statistics, so a few
dozen images cannot corrupt the statistics and the fitted block computes in training exactly what it computes in
deployment. ``recalibrate`` first re-estimates the student's statistics on the fitting images: measured on the real YOLOv8n below
it did not help (8.2 AP against 8.5; it even moved the unpruned first blocks away from the teacher), so it is off.

Each block is fitted with Adam on the MSE of its output over the fitting images and checked on held-out images: a
block whose held-out error grows is put back as it was (``reverted`` in the report). Default lr 1e-3: on the real
YOLOv8n (10 % BN-γ cut, 256 px, 48 + 16 coco-unlabeled images, 200 iterations per block) it left a held-out head error
of 0.47 and 8.5 AP against 0.61 and 6.5 AP at 1e-4 (one-shot cut: 1.16, 0.0 AP; unpruned 25.7).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from copy import deepcopy
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from yolocomp.distill.box_bins import box_kd_loss, box_targets
from yolocomp.errors import UserError
from yolocomp.recon.blocks import Block, OutputCache, detector_blocks, is_head, run_block

FIT = ("all", "changed")
#: Image pixels one fitting iteration uses at most: a cached batch of 8 images at 320 px. Larger images fit on a random
#: subset of the batch's images each iteration, so a 640 px block costs what a 320 px one does instead of 16x more
#: (its feature maps no longer fit the CPU's caches).
FIT_PIXELS = 8 * 320 * 320


def as_batches(images: torch.Tensor | Iterable[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """Float image batches (N, 3, H, W, 0-1) from a tensor (split into ``batch_size``) or an iterable of batches."""
    if isinstance(images, torch.Tensor):
        return [b.float() for b in images.split(batch_size)]
    return [torch.as_tensor(b).float() for b in images]


def relative_error(outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> float:
    """Squared error over the targets' variance around their per-channel mean (1 - R^2): 0 is exact, 1 is no better
    than a constant per channel. Per-channel centring keeps large constant biases (the head's class prior) from
    making every error look small."""
    num = sum(float((o.float() - t.float()).pow(2).sum()) for o, t in zip(outputs, targets))
    dims = [d for d in range(targets[0].ndim) if d != 1]
    count = sum(t[:1].numel() / t.shape[1] * t.shape[0] for t in targets)
    mean = sum(t.float().sum(dims) for t in targets) / count
    shape = [1, -1] + [1] * (targets[0].ndim - 2)
    den = sum(float((t.float() - mean.view(shape)).pow(2).sum()) for t in targets)
    return num / max(den, 1e-12)


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def _kept(channel_map: Mapping[Any, Sequence[int] | torch.Tensor] | None) -> dict[int, torch.Tensor]:
    return {int(k): torch.as_tensor(v, dtype=torch.long) for k, v in (channel_map or {}).items()}


def _select(outputs: list[torch.Tensor], keep: torch.Tensor | None) -> list[torch.Tensor]:
    return outputs if keep is None else [o.index_select(1, keep.to(o.device)) for o in outputs]


#: student block kinds that stand in for another teacher kind (``light_head`` turns one C2f into a C3k2)
STANDS_IN = {("C3k2", "C2f")}
HEAD_LOSSES = ("mse", "kd")


def class_kd_loss(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """The teacher's class probabilities as soft targets (binary cross-entropy summed over classes, dim 1), each
    anchor weighted by the teacher's confidence. On logits, MSE is ruled by the many background anchors and their very
    negative logits; this is what lets a class branch learn from scratch."""
    prob = teacher_logits.sigmoid()
    weight = prob.amax(1, keepdim=True).clamp_min(0.01)
    bce = nn.functional.binary_cross_entropy_with_logits(logits, prob, reduction="none")
    return (bce * weight).sum() / weight.sum()


def head_kd_loss(out: torch.Tensor, target: torch.Tensor, nc: int, box_probabilities: bool = False) -> torch.Tensor:
    """Fitting loss of a Detect block: MSE on the box distributions plus :func:`class_kd_loss` on the class logits.
    ``box_probabilities``: the target's boxes are probabilities on the student's bins (:func:`box_view`), fitted by
    cross-entropy weighted by the teacher's confidence."""
    boxes = out.shape[1] - nc
    cls = class_kd_loss(out[:, boxes:], target[:, boxes:])
    if box_probabilities:
        weight = target[:, boxes:].sigmoid().amax(1).clamp_min(0.01)
        return box_kd_loss(out[:, :boxes], target[:, :boxes], weight, probabilities=True) + cls
    return nn.functional.mse_loss(out[:, :boxes], target[:, :boxes]) + cls


def box_view(out: torch.Tensor, nc: int, bins: int) -> torch.Tensor:
    """A raw head output (boxes, then class logits) with each box side as probabilities on ``bins`` bins: how heads
    with different ``reg_max`` are compared (a teacher's extra bins fold into the last, :mod:`yolocomp.distill.box_bins`)."""
    return torch.cat([box_targets(out[:, :-nc], bins), out[:, -nc:].float()], 1)


def _head_bins(student_head: nn.Module, teacher_head: nn.Module) -> int | None:
    """The student's bins when its Detect has fewer DFL bins than the teacher's (outputs compared by :func:`box_view`)."""
    if not (is_head(student_head) and is_head(teacher_head)) or student_head.reg_max == teacher_head.reg_max:
        return None
    return int(student_head.reg_max)


def _changed(student_block: Block, teacher_block: Block) -> bool:
    s, t = student_block.module.state_dict(), teacher_block.module.state_dict()
    return s.keys() != t.keys() or any(s[k].shape != t[k].shape for k in s)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Sequence[torch.Tensor]) -> None:
    """Re-estimate every BatchNorm's running statistics as the plain average over ``batches``."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [bn.momentum for bn in bns]
    device = next(model.parameters()).device
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    model.train()
    try:
        for b in batches:
            model(b.to(device))
    finally:
        for bn, m in zip(bns, momenta):
            bn.momentum = m
        model.eval()


class BlockFit:
    """How one block is fitted: which tensors learn (with which learning rate), what the loss adds to the output MSE,
    and what happens once the fit ends. The default fits every float parameter of the block (pruning recovery);
    :class:`yolocomp.quant.adaround.AdaRoundFit` learns weight rounding and activation step sizes instead (PTQ)."""

    def __init__(self, lr: float = 1e-3):
        self.lr = lr

    def begin(self, module: nn.Module) -> list[dict]:
        """Prepare ``module`` for fitting; return the optimizer's parameter groups."""
        return [{"params": [p for p in module.parameters() if p.dtype.is_floating_point], "lr": self.lr}]

    def penalty(self, module: nn.Module, output: torch.Tensor, progress: float) -> torch.Tensor | float:
        """A term added to the output MSE at ``progress`` (0 -> 1 over the iterations)."""
        return 0.0

    def end(self, module: nn.Module) -> dict:
        """Finish the fit (e.g. make rounding hard); returns report entries for the block."""
        return {}

    def settings(self) -> dict:
        return {"lr": self.lr}


def fit_images(batch: int, image_pixels: int, fit_pixels: int | None = FIT_PIXELS) -> int:
    """Images of a cached batch one fitting iteration uses: all of them up to ``fit_pixels`` image pixels, else as many
    as fit (at least one). ``fit_pixels`` None: always the whole batch."""
    if fit_pixels is None:
        return batch
    return max(1, min(batch, fit_pixels // max(image_pixels, 1)))


def _fit_block(block: Block, cache: OutputCache, targets: list[torch.Tensor], fit_ids: list[int], iters: int,
               fitter: BlockFit, device: torch.device, gen: torch.Generator, per_iter: int,
               head_loss: str = "mse", bins: int | None = None) -> dict:
    nc = block.module.nc if head_loss == "kd" and is_head(block.module) else None
    groups = fitter.begin(block.module)
    params = [p for g in groups for p in g["params"]]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(groups)
    try:
        for it in range(iters):
            b = fit_ids[int(torch.randint(len(fit_ids), (1,), generator=gen))]
            inputs, target = cache.inputs(block, b, device), targets[b].to(device)
            if per_iter < len(target):
                pick = torch.randperm(len(target), generator=gen)[:per_iter].to(device)
                inputs, target = [x.index_select(0, pick) for x in inputs], target.index_select(0, pick)
            out = run_block(block, inputs)
            if nc is not None:
                match = head_kd_loss(out, target, nc, box_probabilities=bins is not None)
            else:
                match = nn.functional.mse_loss(out if bins is None else box_view(out, block.module.nc, bins), target)
            loss = match + fitter.penalty(block.module, out, it / iters)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    return fitter.end(block.module)


@torch.no_grad()
def _block_error(block: Block, cache: OutputCache, targets: list[torch.Tensor], ids: list[int],
                 device: torch.device, bins: int | None = None) -> float:
    outs = [run_block(block, cache.inputs(block, b, device)) for b in ids]
    if bins is not None:
        outs = [box_view(o, block.module.nc, bins) for o in outs]
    return relative_error(outs, [targets[b].to(device) for b in ids])


def head_error(student: nn.Module, teacher: nn.Module, images: torch.Tensor | Iterable[torch.Tensor],
               batch_size: int = 8) -> float:
    """Relative error of the student's raw head output (box distributions, class logits) vs the teacher's (both as
    :func:`box_view` when the student's Detect has fewer DFL bins)."""
    batches = as_batches(images, batch_size)
    bins = _head_bins(student.model[-1], teacher.model[-1])
    outs = []
    for model in (student, teacher):
        was = model.training
        model.eval()
        blocks = detector_blocks(model)
        cache = OutputCache(batches, blocks)
        device = next(model.parameters()).device
        for blk in blocks:
            last = cache.advance(blk, device)
        outs.append(last if bins is None else [box_view(o, model.model[-1].nc, bins) for o in last])
        model.train(was)
    return relative_error(outs[0], outs[1])


def reconstruct(
    student: nn.Module,
    teacher: nn.Module,
    images: torch.Tensor | Iterable[torch.Tensor],
    *,
    channel_map: Mapping[Any, Sequence[int] | torch.Tensor] | None = None,
    held_out: torch.Tensor | Iterable[torch.Tensor] | None = None,
    holdout: float = 0.25,
    iters: int = 200,
    lr: float = 1e-3,
    batch_size: int = 8,
    fit: str = "all",
    recalibrate: bool = False,
    store: str | torch.device = "cpu",
    seed: int = 0,
    fitter: BlockFit | None = None,
    fit_pixels: int | None = FIT_PIXELS,
    head_loss: str = "mse",
    head_iters: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Fit the student's blocks in place, in order, to the teacher's block outputs; returns the report.

    ``images``: calibration images (a tensor N x 3 x H x W in 0-1, or an iterable of such batches). ``held_out``:
    images to measure on (default: the last ``holdout`` share of the batches, never fitted on). ``fit``: ``all``
    blocks with parameters (their inputs change when anything upstream changed) or only the ``changed`` ones (other
    shapes than the teacher's). ``store``: where cached feature maps live (``cpu`` keeps GPU memory for the fit).
    ``fitter``: what learns in each block (default :class:`BlockFit`: every float parameter at ``lr``).
    ``fit_pixels``: image pixels per fitting iteration at most (:data:`FIT_PIXELS`; None: whole cached batches).
    ``head_loss``: ``mse`` fits Detect like any block, ``kd`` with :func:`head_kd_loss` (a class branch learning from
    scratch); ``head_iters``: iterations of the Detect block (default ``iters``).
    Report: per block ``layer``, ``type``, ``changed``, ``fitted``, ``reverted``, ``error_before`` / ``error_after``
    (relative MSE on the held-out images, kept channels only), and ``head_error`` before / after for the whole model.
    """
    if fit not in FIT:
        raise UserError(f"fit '{fit}' unknown; use one of {FIT}")
    if iters < 0 or lr <= 0 or (head_iters is not None and head_iters < 0):
        raise UserError(f"iters={iters} and head_iters={head_iters} must be >= 0 and lr={lr} > 0")
    if head_loss not in HEAD_LOSSES:
        raise UserError(f"head_loss '{head_loss}' unknown; use one of {HEAD_LOSSES}")
    batches = as_batches(images, batch_size)
    if held_out is None:
        n_held = max(1, round(holdout * len(batches)))
        if len(batches) - n_held < 1:
            raise UserError(f"{len(batches)} image batch(es) cannot be split into fitting and held-out images; give "
                            f"more images or held_out=")
        batches, held = batches[:-n_held], batches[-n_held:]
    else:
        held = as_batches(held_out, batch_size)
    if len(student.model) != len(teacher.model):
        raise UserError(f"student has {len(student.model)} layers, teacher {len(teacher.model)}: not the same detector")
    device = next(student.parameters()).device
    if next(teacher.parameters()).device != device:
        teacher = deepcopy(teacher).to(device)
    s_was, t_was = student.training, teacher.training
    start = time.perf_counter()
    head_before = head_error(student, teacher, held, batch_size)  # the student as given
    if recalibrate:
        recalibrate_bn(student, batches)
    student.eval()
    teacher.eval()
    keep = _kept(channel_map)
    s_blocks, t_blocks = detector_blocks(student), detector_blocks(teacher)
    all_batches = batches + held
    fit_ids, held_ids = list(range(len(batches))), list(range(len(batches), len(all_batches)))
    s_cache, t_cache = OutputCache(all_batches, s_blocks, store), OutputCache(all_batches, t_blocks, store)
    gen = torch.Generator().manual_seed(seed)
    fitter = fitter or BlockFit(lr)
    per_iter = fit_images(max(len(b) for b in batches), batches[0].shape[-2] * batches[0].shape[-1], fit_pixels)
    rows = []
    try:
        for sb, tb in tqdm(list(zip(s_blocks, t_blocks)), desc="reconstruct", disable=not progress, leave=False):
            if sb.kind != tb.kind and (sb.kind, tb.kind) not in STANDS_IN:
                raise UserError(f"layer {sb.index} is {sb.kind} in the student but {tb.kind} in the teacher")
            targets = _select(t_cache.advance(tb, device), keep.get(sb.index))
            bins = _head_bins(sb.module, tb.module)
            if bins is not None:
                targets = [box_view(t, tb.module.nc, bins) for t in targets]
            row = {"layer": sb.index, "type": sb.kind, "changed": _changed(sb, tb), "fitted": False, "reverted": False}
            if sb.fittable:
                row["error_before"] = _block_error(sb, s_cache, targets, held_ids, device, bins)
                n_iters = head_iters if head_iters is not None and is_head(sb.module) else iters
                if n_iters and (fit == "all" or row["changed"]):
                    saved = deepcopy(sb.module.state_dict())
                    row.update(_fit_block(sb, s_cache, targets, fit_ids, n_iters, fitter, device, gen, per_iter,
                                          head_loss, bins))
                    row["fitted"] = True
                    row["error_after"] = _block_error(sb, s_cache, targets, held_ids, device, bins)
                    if row["error_after"] > row["error_before"]:
                        sb.module.load_state_dict(saved)
                        row["reverted"] = True
                        row["error_after"] = row["error_before"]
                else:
                    row["error_after"] = row["error_before"]
                row["error_before"], row["error_after"] = _sig(row["error_before"]), _sig(row["error_after"])
            s_cache.advance(sb, device)
            del targets
            rows.append(row)
        head_after = head_error(student, teacher, held, batch_size)
    finally:
        student.train(s_was)
        teacher.train(t_was)
    return {
        "blocks": rows,
        "head_error": {"before": _sig(head_before), "after": _sig(head_after)},
        "images": {"fit": sum(len(b) for b in batches), "held_out": sum(len(b) for b in held)},
        "settings": {"iters": iters, "head_iters": iters if head_iters is None else head_iters, "head_loss": head_loss,
                     **fitter.settings(), "batch_size": batch_size, "images_per_iteration": per_iter,
                     "fit": fit, "recalibrate_bn": recalibrate,
                     "bn": "eval (running statistics fixed)"},
        "seconds": round(time.perf_counter() - start, 2),
    }
