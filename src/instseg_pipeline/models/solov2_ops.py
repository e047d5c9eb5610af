"""SOLOv2's tensor operations, free of any module state: Matrix NMS, the centre-region target
assignment, the Dice loss, tight boxes of masks and coordinate channels.

Every function here is plain torch on tensors, traceable where the network uses it at
inference (`matrix_nms`, `points_nms`, `tight_boxes`, `coordinates`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.models.detection import _utils as det_utils

from instseg_pipeline.models.boxes import tight_boxes  # noqa: F401  (SOLO has no box head)

KERNELS = ("linear", "gaussian")
# linear decay divides by (1 - compensate IoU); a mask identical to a higher one has
# compensate IoU 1, and its column of the decay matrix must stay finite
LINEAR_EPS = 1e-6
DICE_EPS = 1e-3


# --- Matrix NMS --------------------------------------------------------------------------------

def matrix_decay(masks: torch.Tensor, labels: torch.Tensor, kernel: str = "gaussian",
                 sigma: float = 2.0, areas: torch.Tensor | None = None) -> torch.Tensor:
    """Decay factor of each mask, masks sorted best score first (SOLOv2 eq. 3-4).

    ``masks`` bool/float [N, H, W] (or flat [N, H*W]) binary masks in score order, ``labels`` int64 [N],
    ``areas`` float [N] (default: the masks' pixel counts). Returns float [N] in [0, 1]:
    ``decay_j = min_i f(iou_ij) / f(iou_i,max)`` over higher-scored masks i of the same class,
    where ``iou_i,max`` is the largest IoU of i with any mask above it (how much i was itself
    suppressed). ``f(x) = 1 - x`` (linear) or ``exp(-sigma x^2)`` (gaussian; ``sigma`` 2.0
    multiplies, the convention of the SOLO code, i.e. the paper's ``exp(-x^2 / 0.5)``).
    """
    if kernel not in KERNELS:
        raise ValueError(f"matrix NMS kernel {kernel!r}: use one of {KERNELS}")
    flat = (masks if masks.dim() == 2 else masks.flatten(1)).float()
    areas = flat.sum(1) if areas is None else areas.float()
    inter = flat @ flat.T
    union = areas[:, None] + areas[None, :] - inter
    # only pairs (i above j) count: the upper triangle without the diagonal
    same = (labels[:, None] == labels[None, :]).float().triu(1)
    iou = (inter / union.clamp(min=1e-6)).triu(1) * same
    compensate = iou.max(0).values[:, None]          # [N, 1]: row i's own suppression
    if kernel == "gaussian":
        ratio = torch.exp(-sigma * (iou ** 2 - compensate ** 2))
    else:
        ratio = (1 - iou) / (1 - compensate).clamp(min=LINEAR_EPS)
    return ratio.min(0).values


def sort_desc(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``scores`` float [N] best first; ties keep their input order (stable). Under a tracer,
    TopK over all N (ONNX TopK breaks ties by the lower index, the same order)."""
    if torch.jit.is_tracing():
        return torch.topk(scores, scores.shape[0], sorted=True)
    return torch.sort(scores, descending=True, stable=True)


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best ``min(k, N)`` scores (sorted, ties by input order) and their indices."""
    values, order = sort_desc(scores)
    keep = det_utils._topk_min(scores, k, 0) if torch.jit.is_tracing() else min(k, len(scores))
    return values[:keep], order[:keep]


def matrix_nms(masks: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor,
               kernel: str = "gaussian", sigma: float = 2.0, pre_top_k: int = 500,
               update_threshold: float = 0.05, max_detections: int = 100,
               areas: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Matrix NMS: decayed scores of the kept masks and their indices into the inputs.

    ``masks`` bool [N, H, W] or [N, H*W], ``labels`` int64 [N], ``scores`` float [N] (any
    order). The
    best ``pre_top_k`` are decayed (`matrix_decay`); those with a decayed score
    ``>= update_threshold`` are kept, best first, at most ``max_detections``. Returns
    (scores float [M], indices int64 [M]).
    """
    scores, order = top_k(scores, pre_top_k)
    if order.numel() == 0:
        return scores, order
    area = None if areas is None else areas[order]
    decayed = scores * matrix_decay(masks[order], labels[order], kernel, sigma, area)
    kept = torch.nonzero(decayed >= update_threshold).reshape(-1)
    decayed, order = decayed[kept], order[kept]
    best, rank = top_k(decayed, max_detections)
    return best, order[rank]


def points_nms(heat: torch.Tensor) -> torch.Tensor:
    """Category scores [B, C, S, S] with every cell that is not a 2x2 local maximum zeroed
    (SOLO's cheap peak picking before Matrix NMS)."""
    peaks = F.max_pool2d(heat, 2, stride=1, padding=1)[:, :, :-1, :-1]
    return heat * (peaks == heat).to(heat.dtype)


# --- targets -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class LevelTargets:
    """One pyramid level's targets for one image.

    ``labels`` int64 [S, S]: the class of each grid cell (0 = background);
    ``owner`` int64 [S, S]: the instance whose mask a positive cell predicts (-1: none).
    """

    labels: torch.Tensor
    owner: torch.Tensor


def mass_centres(masks: torch.Tensor) -> torch.Tensor:
    """float [K, 2] (y, x) centres of mass of ``masks`` [K, H, W], in pixel coordinates
    where pixel (i, j) covers [i, i + 1) x [j, j + 1) (its centre is i + 0.5)."""
    masks = masks.float()
    total = masks.sum((1, 2)).clamp(min=1)
    ys = torch.arange(masks.shape[1], dtype=torch.float32, device=masks.device) + 0.5
    xs = torch.arange(masks.shape[2], dtype=torch.float32, device=masks.device) + 0.5
    cy = (masks.sum(2) * ys).sum(1) / total
    cx = (masks.sum(1) * xs).sum(1) / total
    return torch.stack([cy, cx], 1)


def _cell(value: float, size: float, grid: int) -> int:
    """The grid cell (of ``grid`` over ``size`` pixels) holding coordinate ``value``."""
    return int(value * grid // size)


def centre_region(centre: tuple[float, float], half: tuple[float, float],
                  size: tuple[int, int], grid: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) inclusive cells of the centre region of one instance.

    The region is the box of half-size ``half`` (y, x) around the mass centre ``centre``,
    clipped to the grid and to the 3x3 cells around the centre's own cell.
    """
    (cy, cx), (hh, hw), (height, width) = centre, half, size
    row, col = _cell(cy, height, grid), _cell(cx, width, grid)
    top = max(0, _cell(cy - hh, height, grid), row - 1)
    bottom = min(grid - 1, _cell(cy + hh, height, grid), row + 1)
    left = max(0, _cell(cx - hw, width, grid), col - 1)
    right = min(grid - 1, _cell(cx + hw, width, grid), col + 1)
    return top, bottom, left, right


def assign_targets(boxes: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor,
                   num_grids: Sequence[int], scale_ranges: Sequence[Sequence[float]],
                   sigma: float = 0.2) -> list[LevelTargets]:
    """SOLO's centre-region assignment for one image, one `LevelTargets` per level.

    ``boxes`` float [K, 4] xyxy, ``labels`` int64 [K] (1..C-1), ``masks`` [K, H, W] on the
    (padded) input the grids divide. An instance goes to every level whose scale range
    ``[low, high]`` holds ``sqrt(w h)`` of its box; there the cells of its centre region
    (mass centre, half-size ``sigma / 2`` of the box, at most 3x3 cells) become positive.
    Empty masks are skipped; where instances overlap, the later one owns the cell.
    """
    size = (int(masks.shape[-2]), int(masks.shape[-1]))
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0)
    scales = wh.prod(1).sqrt().tolist()
    halves = (0.5 * sigma * wh).flip(1).tolist()      # (y, x) half-sizes
    centres = mass_centres(masks).tolist()
    valid = (masks.flatten(1).sum(1) > 0).tolist()
    out = []
    for grid, (low, high) in zip(num_grids, scale_ranges):
        level_labels = torch.zeros(grid, grid, dtype=torch.int64)
        owner = torch.full((grid, grid), -1, dtype=torch.int64)
        for k, scale in enumerate(scales):
            if not (valid[k] and low <= scale <= high):
                continue
            top, bottom, left, right = centre_region(centres[k], halves[k], size, grid)
            level_labels[top:bottom + 1, left:right + 1] = labels[k]
            owner[top:bottom + 1, left:right + 1] = k
        out.append(LevelTargets(level_labels.to(boxes.device), owner.to(boxes.device)))
    return out


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """float [P]: ``1 - 2 sum(p t) / (sum(p^2) + sum(t^2))`` per mask (SOLOv2 eq. 2), for
    ``logits`` [P, M] and ``targets`` [P, M] in [0, 1]."""
    p = logits.sigmoid()
    inter = (p * targets).sum(1)
    return 1 - 2 * inter / ((p * p).sum(1) + (targets * targets).sum(1) + DICE_EPS)


# --- inference helpers -------------------------------------------------------------------------


def coordinates(feature: torch.Tensor) -> torch.Tensor:
    """float [B, 2, H, W]: x then y, each running linearly from -1 to 1 across ``feature``
    [B, C, H, W] (CoordConv's two channels)."""
    b, _, height, width = feature.shape
    kw = {"device": feature.device, "dtype": feature.dtype}
    xs = torch.arange(width, **kw) / max(width - 1, 1) * 2 - 1
    ys = torch.arange(height, **kw) / max(height - 1, 1) * 2 - 1
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y])[None].expand(b, -1, -1, -1)
