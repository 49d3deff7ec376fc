"""Per-level masks derived from ground-truth boxes (``batch["bboxes"]`` normalised xywh, ``batch["batch_idx"]``).

Feature coordinates: a level of size (h, w) covers the (letterboxed, padded) image, so a normalised coordinate u maps
to u * w cells. Cell (i, j) spans [j, j + 1) x [i, i + 1) and its centre is (j + 0.5, i + 0.5).

* :func:`box_cell_ranges` / :func:`fgd_masks` (FGD, Yang et al. 2022): a box's locations on a level are exactly the
  cells it overlaps, rows ``floor(y1) .. ceil(y2) - 1`` and columns ``floor(x1) .. ceil(x2) - 1`` (at least one cell).
  The foreground scale mask holds ``1 / (number of cells of the box)``, the largest value where boxes overlap (small
  objects keep their weight); the background mask is 1 outside every box, normalised to sum 1 per image. An image
  without boxes is background everywhere.
* :func:`fgfi_masks` (fine-grained imitation, Wang et al. 2019), adapted to anchor-free YOLO: each location gets one
  virtual square prior of side ``prior_scale * stride`` (i.e. ``prior_scale`` cells, default 4 = RetinaNet's base
  anchor scale) centred on the cell. For every GT box and level, the IoUs between the box and all priors of that
  level give the maximum M; the locations whose prior has IoU > psi * M (paper: psi = 0.5) join the mask, and the
  image's mask is the union over its boxes. The maximum is taken per level, so every object is imitated on every
  level that feeds the head: on levels coarser than the object this marks the few cells around it, on finer levels
  roughly the cells inside it (the paper's anchors per level play the role of the priors).
* :func:`with_teacher_boxes`: images without any GT box in the batch (unlabelled images) take the teacher's confident
  detections as their boxes, so the masks still single out objects when training without labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def _boxes_xyxy(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    boxes = batch["bboxes"].to(device=device, dtype=torch.float32).reshape(-1, 4)
    idx = batch["batch_idx"].to(device=device).reshape(-1).long()
    xy, wh = boxes[:, :2], boxes[:, 2:]
    return torch.cat([xy - wh / 2, xy + wh / 2], 1).clamp(0, 1), idx


def _max_into(out: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> None:
    """out[idx[k]] = max(out[idx[k]], values[k]) for every box k (several boxes may share an image)."""
    flat = out.view(out.shape[0], -1)
    flat.scatter_reduce_(0, idx[:, None].expand(-1, flat.shape[1]), values.reshape(len(idx), -1), "amax")


def box_cell_ranges(boxes_xyxy: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Cell index ranges [r0, r1) x [c0, c1) of the cells each normalised xyxy box overlaps: (n, 4) as r0, r1, c0, c1."""
    x1, y1, x2, y2 = (boxes_xyxy[:, k] for k in range(4))
    c0 = torch.floor(x1 * w).clamp(0, w - 1)
    r0 = torch.floor(y1 * h).clamp(0, h - 1)
    c1 = torch.maximum(torch.ceil(x2 * w), c0 + 1).clamp(max=w)
    r1 = torch.maximum(torch.ceil(y2 * h), r0 + 1).clamp(max=h)
    return torch.stack([r0, r1, c0, c1], 1).long()


def fgd_masks(batch: dict, sizes: Sequence[tuple[int, int]], device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """FGD's (foreground scale mask, normalised background mask) for each level size (h, w); each (B, h, w)."""
    n_img = batch["img"].shape[0]
    boxes, idx = _boxes_xyxy(batch, device)
    out = []
    for h, w in sizes:
        fg = torch.zeros(n_img, h, w, device=device)
        if len(boxes):
            r0, r1, c0, c1 = box_cell_ranges(boxes, h, w).unbind(1)
            rows = torch.arange(h, device=device)
            cols = torch.arange(w, device=device)
            inside = ((rows >= r0[:, None]) & (rows < r1[:, None]))[:, :, None] & (
                (cols >= c0[:, None]) & (cols < c1[:, None])
            )[:, None, :]
            scale = 1.0 / ((r1 - r0) * (c1 - c0)).float()
            _max_into(fg, idx, inside.float() * scale[:, None, None])
        bg = (fg == 0).float()
        bg = bg / bg.sum((1, 2), keepdim=True).clamp(min=1)
        out.append((fg, bg))
    return out


def prior_ious(boxes_xyxy: torch.Tensor, h: int, w: int, prior_scale: float) -> torch.Tensor:
    """IoU (n, h*w) between normalised xyxy boxes and the square prior of side ``prior_scale`` cells at each cell."""
    device = boxes_xyxy.device
    cy, cx = torch.meshgrid(torch.arange(h, device=device) + 0.5, torch.arange(w, device=device) + 0.5, indexing="ij")
    half = prior_scale / 2
    priors = torch.stack([cx - half, cy - half, cx + half, cy + half], -1).reshape(-1, 4)  # cell units
    gt = boxes_xyxy * torch.tensor([w, h, w, h], device=device, dtype=boxes_xyxy.dtype)
    lt = torch.maximum(gt[:, None, :2], priors[None, :, :2])
    rb = torch.minimum(gt[:, None, 2:], priors[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_gt = (gt[:, 2:] - gt[:, :2]).prod(-1)
    return inter / (area_gt[:, None] + prior_scale**2 - inter).clamp(min=1e-9)


def fgfi_masks(
    batch: dict, sizes: Sequence[tuple[int, int]], device: torch.device, psi: float = 0.5, prior_scale: float = 4.0
) -> list[torch.Tensor]:
    """Fine-grained imitation masks (B, h, w) of 0/1 for each level size (h, w)."""
    n_img = batch["img"].shape[0]
    boxes, idx = _boxes_xyxy(batch, device)
    out = []
    for h, w in sizes:
        mask = torch.zeros(n_img, h * w, device=device)
        if len(boxes):
            iou = prior_ious(boxes, h, w, prior_scale)
            best = iou.amax(1, keepdim=True)
            near = ((iou > psi * best) & (best > 0)).float()
            _max_into(mask, idx, near)
        out.append(mask.view(n_img, h, w))
    return out


def images_without_boxes(batch: dict) -> torch.Tensor:
    """(B,) bool: images of the batch that have no GT box (unlabelled, or labelled as background)."""
    n_img = batch["img"].shape[0]
    has = torch.zeros(n_img, dtype=torch.bool)
    idx = batch["batch_idx"].reshape(-1).long().cpu()
    has[idx[(idx >= 0) & (idx < n_img)]] = True
    return ~has


def teacher_boxes(teacher_out: Any, imgsz_hw: tuple[int, int], conf: float = 0.25, iou: float = 0.7,
                  max_det: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's detections with confidence > ``conf`` after NMS, as (normalised xywh (n, 4), batch_idx (n,)).

    ``teacher_out``: the teacher's eval-mode output (decoded predictions in input pixels, or ``(decoded, raw)``)."""
    from yolocomp.eval.evaluate import non_max_suppression

    decoded = teacher_out[0] if isinstance(teacher_out, (tuple, list)) else teacher_out
    h, w = imgsz_hw
    outputs = non_max_suppression(decoded.detach(), conf, iou, max_det, multi_label=False)
    scale = torch.tensor([w, h, w, h], device=decoded.device, dtype=torch.float32)
    xyxy = torch.cat([o[:, :4].float() for o in outputs]) / scale
    idx = torch.cat([torch.full((len(o),), i, device=decoded.device) for i, o in enumerate(outputs)])
    return torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1), idx.float()


def with_teacher_boxes(batch: dict, teacher_out: Any, conf: float = 0.25) -> dict:
    """``batch`` with the teacher's confident boxes added for the images that have no GT box (keys ``img``,
    ``bboxes``, ``batch_idx``: what the mask builders read). Unchanged when every image has a box."""
    empty = images_without_boxes(batch)
    if not empty.any():
        return batch
    boxes, idx = teacher_boxes(teacher_out, tuple(batch["img"].shape[-2:]), conf)
    keep = empty.to(idx.device)[idx.long()]
    device = boxes.device
    return {
        "img": batch["img"],
        "bboxes": torch.cat([batch["bboxes"].to(device, torch.float32).reshape(-1, 4), boxes[keep]]),
        "batch_idx": torch.cat([batch["batch_idx"].to(device, torch.float32).reshape(-1), idx[keep]]),
    }
