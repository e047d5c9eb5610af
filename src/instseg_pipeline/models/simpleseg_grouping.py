"""The tensor arithmetic of the ``simpleseg`` family: training targets and the grouping step.

Both work on one image at the resolution the losses and the grouping use (the resized
input, stride 1). Coordinates are pixel indices (row y, column x); an offset points from
a pixel to the centre of its instance, ``(dy, dx)`` in pixels.

- `build_targets`: instance masks -> semantic map, Gaussian centre heatmap, offsets and
  the pixels each loss reads.
- `find_centres`: peaks of a centre heatmap (max-pool NMS, threshold, top-k).
- `group_pixels`: every pixel to the nearest centre after adding its offset; each group's
  class from the mean class probability of its foreground pixels; its score; its mask.

Everything in the eval path is written with dynamic shapes in mind (grids from cumulative
sums, a far-away dummy centre instead of a branch on "no centres"), so that the TorchScript
tracer records one graph valid for every image size and every number of detections.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import distance_transform_edt

from instseg_pipeline.models.boxes import tight_boxes as boxes_of_masks

IGNORE = 255  # semantic target of pixels no loss reads (crowd regions, batch padding)
# where the dummy centre sits (pixels): farther from any pixel than any real centre, so it
# wins a pixel only when there is no real centre; its square (1e12) is exact in float32
FAR = 1.0e6


@dataclass(frozen=True)
class Targets:
    """One image's training targets at ``[H, W]`` (the padded batch size).

    semantic int64 [H, W] (0 background, 1..C-1 classes, `IGNORE`); center float [H, W]
    (max over instances of a Gaussian around each `instance_centres`); offset float [2, H, W]
    (dy, dx to the pixel's centre, 0 off instances); valid bool [H, W] (inside the image,
    not crowd: the pixels of the semantic and centre losses); instance bool [H, W] (the
    pixels of the offset loss); owner int64 [H, W] (the index of the instance owning each
    pixel, -1 for none).
    """

    semantic: torch.Tensor
    center: torch.Tensor
    offset: torch.Tensor
    valid: torch.Tensor
    instance: torch.Tensor
    owner: torch.Tensor

    def pixel_weights(self, weights: torch.Tensor) -> torch.Tensor:
        """float [H, W]: each pixel's weight from its owner's entry of ``weights`` float
        [K] (one per instance); 1 where no instance owns it."""
        weights = weights.to(self.owner.device)
        ones = torch.ones(1, dtype=weights.dtype, device=weights.device)
        return torch.cat([weights, ones])[self.owner]  # index -1 reads the appended 1


def _grids(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, x) float [H, W] pixel indices of a float [H, W] tensor.

    Cumulative sums rather than ``arange(H)``: the tracer records them with the input's
    own shape, so the ONNX graph serves any image size.
    """
    ones = torch.ones_like(like)
    return ones.cumsum(0) - 1, ones.cumsum(1) - 1


def _owners(masks: torch.Tensor) -> torch.Tensor:
    """int64 [h, w]: index of the instance owning each pixel, -1 for none.

    Where masks overlap the smallest instance wins (the one in front, usually); the
    dataset's visible masks do not overlap.
    """
    owner = torch.full(masks.shape[1:], -1, dtype=torch.int64, device=masks.device)
    areas = masks.flatten(1).sum(1)
    for k in torch.argsort(areas, descending=True, stable=True).tolist():
        owner[masks[k] > 0] = k
    return owner


def build_targets(masks: torch.Tensor, labels: torch.Tensor, crowd: torch.Tensor,
                  padded: tuple[int, int], sigma: float) -> Targets:
    """Targets of one image whose instances are ``masks`` uint8 [K, h, w] (the resized
    image) with ``labels`` int64 [K] and ``crowd`` bool [K], padded to ``padded`` (H, W).

    Crowd instances are ignored by the semantic and centre losses and are no instance.
    Centres: `instance_centres`; the heatmap is exp(-d^2 / (2 sigma^2)) around each.
    """
    height, width = int(padded[0]), int(padded[1])
    h, w = int(masks.shape[-2]), int(masks.shape[-1])
    device = masks.device
    owner = torch.full((height, width), -1, dtype=torch.int64, device=device)
    valid = torch.zeros((height, width), dtype=torch.bool, device=device)
    valid[:h, :w] = True
    if len(masks):
        owner[:h, :w] = _owners(masks)
    is_crowd = torch.cat([crowd.to(device).bool(), torch.zeros(1, dtype=torch.bool,
                                                               device=device)])
    crowd_pixels = is_crowd[owner]  # index -1 reads the appended "not crowd"
    valid &= ~crowd_pixels
    instance = (owner >= 0) & ~crowd_pixels
    all_labels = torch.cat([labels.to(device), torch.zeros(1, dtype=torch.int64,
                                                           device=device)])
    semantic = torch.where(valid, all_labels[owner], torch.full_like(owner, IGNORE))
    center, offset = _center_and_offset(masks, crowd, owner, instance, (height, width), sigma)
    return Targets(semantic, center, offset, valid, instance, owner)


def _interior_point(mask: np.ndarray, centre_of_mass: np.ndarray) -> tuple[int, int]:
    """(y, x) of the pixel of ``mask`` bool [h, w] farthest from the background (Euclidean
    distance transform; outside the image counts as background); among equally far ones,
    the nearest to ``centre_of_mass``."""
    ys, xs = np.nonzero(mask)
    y0, x0 = ys.min(), xs.min()
    crop = np.pad(mask[y0:ys.max() + 1, x0:xs.max() + 1], 1)
    depth = distance_transform_edt(crop)[1:-1, 1:-1]
    cy, cx = np.nonzero(depth == depth.max())
    d2 = (cy + y0 - centre_of_mass[0]) ** 2 + (cx + x0 - centre_of_mass[1]) ** 2
    best = int(np.argmin(d2))
    return int(cy[best] + y0), int(cx[best] + x0)


def instance_centres(masks: torch.Tensor) -> torch.Tensor:
    """float [K, 2] (y, x): the centre of each of ``masks`` uint8 [K >= 1, h, w], each
    non-empty: the interior point of `_interior_point` (an integer pixel of the mask).

    Not the centre of mass: that of a ring, a "C" or an object partly hidden behind
    another can fall outside it, e.g. onto the object in front (the synthetic data draws
    small shapes over large ones of the same class), and two instances would then share a
    centre. The deepest pixel lies on the object; for a convex shape it is close to the
    centre of mass.
    """
    means = centres_of_mass(masks).cpu().numpy()
    bits = masks.cpu().numpy().astype(bool)
    points = [_interior_point(bits[k], means[k]) for k in range(len(bits))]
    return torch.tensor(points, dtype=torch.float32, device=masks.device)


def centres_of_mass(masks: torch.Tensor) -> torch.Tensor:
    """float [K, 2] (y, x) mean pixel index of each of ``masks`` [K >= 1, h, w] (NaN for
    an empty mask)."""
    m = masks.flatten(1).float()
    ys, xs = _grids(masks[0].float())
    area = m.sum(1)
    return torch.stack([m @ ys.flatten(), m @ xs.flatten()], 1) / area[:, None]


def _center_and_offset(masks, crowd, owner, instance, size, sigma):
    """float [H, W] Gaussian heatmap (max over non-crowd instances) and float [2, H, W]
    offsets of instance pixels to their owner's centre (`instance_centres`)."""
    center = torch.zeros(size, device=owner.device)
    offset = torch.zeros((2, *size), device=owner.device)
    if not len(masks):
        return center, offset
    ys, xs = _grids(center)
    keep = ~crowd.to(owner.device).bool() & (masks.flatten(1).sum(1) > 0)
    centres = torch.zeros((len(masks), 2), device=owner.device)
    if keep.any():
        centres[keep] = instance_centres(masks[keep])
    for cy, cx in centres[keep].tolist():
        gauss = torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2.0 * sigma ** 2))
        center = torch.maximum(center, gauss)
    target = centres[owner.clamp(min=0)]  # [H, W, 2]
    offset = torch.stack([target[..., 0] - ys, target[..., 1] - xs]) * instance
    return center, offset


# --- grouping -------------------------------------------------------------------------------

def find_centres(heat: torch.Tensor, threshold: float, nms_kernel: int,
                 top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Peaks of ``heat`` float [H, W]: (float [K, 2] (y, x) pixel positions, float [K]
    their heat), best first, K <= top_k.

    A peak is a pixel equal to the max over its ``nms_kernel`` window (max-pool NMS) with
    heat above ``threshold``. Equal neighbours on a plateau are all peaks.
    """
    pooled = F.max_pool2d(heat[None, None], nms_kernel, stride=1,
                          padding=nms_kernel // 2)[0, 0]
    peaks = torch.where(heat == pooled, heat, torch.zeros_like(heat)).flatten()
    values, index = peaks.topk(min(int(top_k), int(peaks.numel())))
    keep = values > threshold
    values, index = values[keep], index[keep]
    ys, xs = _grids(heat)
    return torch.stack([ys.flatten()[index], xs.flatten()[index]], 1), values


def assign_pixels(offset: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """float [K, H*W] one-hot membership: pixel p belongs to the centre nearest to
    p + offset(p) (``offset`` float [2, H, W], ``centres`` float [K, 2]); ties go to the
    better centre. With K = 0 the result is [0, H*W]."""
    ys, xs = _grids(offset[0])
    votes_y = (ys + offset[0]).flatten()
    votes_x = (xs + offset[1]).flatten()
    far = torch.full_like(offset[:, 0, 0], FAR)[None]  # [1, 2] whatever K is
    every = torch.cat([far, centres])  # row 0: the dummy, so argmin has a row to pick
    distance = (votes_y[None] - every[:, :1]) ** 2 + (votes_x[None] - every[:, 1:]) ** 2
    nearest = distance.argmin(0)
    ids = torch.ones_like(centres[:, 0]).cumsum(0)  # 1..K, traced with K's own shape
    return (nearest[None].to(ids.dtype) == ids[:, None]).to(offset.dtype)


@dataclass(frozen=True)
class Groups:
    """The instances of one image at the grouping resolution ``[H, W]``, best first.

    labels int64 [N] (1..C-1), scores float [N] in [0, 1], masks float [N, H, W]
    (foreground probability on the group's pixels, 0 elsewhere), centres float [N, 2].
    """

    labels: torch.Tensor
    scores: torch.Tensor
    masks: torch.Tensor
    centres: torch.Tensor


def group_pixels(probs: torch.Tensor, heat: torch.Tensor, offset: torch.Tensor,
                 threshold: float, nms_kernel: int, top_k: int,
                 score_threshold: float = 0.0) -> Groups:
    """Instances from ``probs`` float [C, H, W] (softmax; channel 0 background), ``heat``
    float [H, W] and ``offset`` float [2, H, W].

    Pixels go to the nearest centre (`find_centres`, `assign_pixels`). A group's foreground
    pixels (foreground probability 1 - P(background) >= 0.5) vote: its label is the class
    of highest mean probability over them, its score the centre's heat (clamped to [0, 1])
    times that mean. Groups without foreground pixels or scoring below ``score_threshold``
    are dropped.
    """
    centres, peak = find_centres(heat, threshold, nms_kernel, top_k)
    member = assign_pixels(offset, centres)  # [K, HW]
    foreground = 1.0 - probs[0].flatten()
    votes = member * (foreground >= 0.5).to(member.dtype)
    count = votes.sum(1)
    mean = (votes @ probs[1:].flatten(1).transpose(0, 1)) / count.clamp(min=1.0)[:, None]
    class_prob, label = mean.max(1)
    scores = peak.clamp(0.0, 1.0) * class_prob
    keep = (count > 0) & (scores >= score_threshold)
    order = torch.argsort(scores[keep], descending=True)
    masks = (member * foreground[None])[keep][order].reshape(-1, *heat.shape)
    return Groups(labels=(label + 1)[keep][order], scores=scores[keep][order], masks=masks,
                  centres=centres[keep][order])


def tight_boxes(masks: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """float [N, 4] x1, y1, x2, y2 (exclusive ends, pixel edges) of ``masks`` float
    [N, H, W] >= ``threshold``; an empty mask gets a zero box (x1 == x2: callers drop it)."""
    return boxes_of_masks(masks >= threshold)
