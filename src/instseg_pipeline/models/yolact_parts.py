"""The tensor arithmetic of YOLACT / YOLACT++ (Bolya et al. 2019): anchors, box coding,
anchor matching, Fast NMS, mask assembly and crop, and the training losses.

Everything works in the pixels of the network's padded input batch unless said otherwise;
`instseg_pipeline.models.yolact` holds the modules and the family entries.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# exp() of a box-size offset is capped as torchvision's BoxCoder does, so an untrained head
# cannot produce infinite boxes
MAX_LOG_SCALE = math.log(1000.0 / 16)


# --- anchors -------------------------------------------------------------------------------

def anchor_shapes(scale: float, multipliers: Sequence[float],
                  ratios: Sequence[float]) -> Tensor:
    """float [A, 2] (width, height) of one level's anchors: for each multiplier, for each
    aspect ratio ``r = w / h``: ``w = s * sqrt(r)``, ``h = s / sqrt(r)`` (area ``s^2``)."""
    shapes = [(scale * m * math.sqrt(r), scale * m / math.sqrt(r))
              for m in multipliers for r in ratios]
    return torch.tensor(shapes, dtype=torch.float32)


def level_anchors(shapes: Tensor, feature: Tensor, image_size: tuple) -> Tensor:
    """float [H*W*A, 4] xyxy anchors of a feature map ``[B, C, H, W]`` over an image of
    ``image_size`` (height, width) pixels, ordered (y, x, anchor) like the head's outputs.

    Centres sit at the middle of each cell; sizes come from the feature map's shape (not
    Python ints), so a traced graph follows the input size.
    """
    height, width = feature.shape[-2], feature.shape[-1]
    stride_y = image_size[0] / height
    stride_x = image_size[1] / width
    ys = (torch.arange(height, dtype=torch.float32, device=feature.device) + 0.5) * stride_y
    xs = (torch.arange(width, dtype=torch.float32, device=feature.device) + 0.5) * stride_x
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    centres = torch.stack([cx, cy], dim=-1).reshape(-1, 1, 2)
    half = shapes.to(feature.device)[None] / 2
    return torch.cat([centres - half, centres + half], dim=-1).reshape(-1, 4)


# --- box coding ----------------------------------------------------------------------------

def _centre_size(boxes: Tensor) -> Tensor:
    """xyxy [N, 4] -> (cx, cy, w, h) [N, 4]."""
    return torch.cat([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], dim=1)


def encode_boxes(boxes: Tensor, anchors: Tensor, variances: Sequence[float]) -> Tensor:
    """SSD offsets float [N, 4] of xyxy ``boxes`` from ``anchors``: centre shift over
    ``variances[0] * anchor size``, log size ratio over ``variances[1]``."""
    g, a = _centre_size(boxes), _centre_size(anchors)
    shift = (g[:, :2] - a[:, :2]) / (variances[0] * a[:, 2:])
    scale = torch.log(g[:, 2:] / a[:, 2:]) / variances[1]
    return torch.cat([shift, scale], dim=1)


def decode_boxes(offsets: Tensor, anchors: Tensor, variances: Sequence[float]) -> Tensor:
    """Inverse of `encode_boxes`: offsets float [N, 4] -> xyxy [N, 4]."""
    a = _centre_size(anchors)
    centre = a[:, :2] + offsets[:, :2] * variances[0] * a[:, 2:]
    size = a[:, 2:] * torch.exp((offsets[:, 2:] * variances[1]).clamp(max=MAX_LOG_SCALE))
    return torch.cat([centre - size / 2, centre + size / 2], dim=1)


# --- matching ------------------------------------------------------------------------------

def match_anchors(anchors: Tensor, gt_boxes: Tensor, gt_labels: Tensor, positive_iou: float,
                  negative_iou: float) -> tuple[Tensor, Tensor]:
    """YOLACT's matching: ``(labels int64 [A], matched int64 [A])``.

    An anchor whose best IoU with a ground-truth box is ``>= positive_iou`` is positive
    (label of that box), ``< negative_iou`` negative (0), in between neutral (-1, no class
    loss). Each box also claims its best anchor (SSD's rule), so no box goes unmatched.
    ``matched`` is the index of the anchor's best box (0 when there is none).
    """
    count = anchors.shape[0]
    if gt_boxes.shape[0] == 0:
        return (torch.zeros(count, dtype=torch.int64, device=anchors.device),
                torch.zeros(count, dtype=torch.int64, device=anchors.device))
    iou = pairwise_iou(gt_boxes, anchors)  # [G, A]
    best_iou, matched = iou.max(dim=0)
    # a box's best anchor is its own, whatever other boxes overlap it more
    best_anchor = iou.argmax(dim=1)
    for index, anchor in enumerate(best_anchor.tolist()):
        matched[anchor] = index
        best_iou[anchor] = 2.0
    labels = gt_labels[matched].clone()
    labels[best_iou < positive_iou] = -1
    labels[best_iou < negative_iou] = 0
    return labels, matched


def pairwise_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU float [..., N, M] of xyxy boxes ``a [..., N, 4]`` and ``b [..., M, 4]``."""
    lt = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(dim=-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(dim=-1)
    union = area_a[..., :, None] + area_b[..., None, :] - inter
    return inter / union.clamp(min=1e-9)


# --- Fast NMS ------------------------------------------------------------------------------

def sort_best_first(values: Tensor, dim: int = -1) -> tuple[Tensor, Tensor]:
    """Descending sort in which ties keep their order. The stable overload does not
    export; traced, the plain sort becomes ONNX TopK, whose ties keep their order too."""
    if torch.jit.is_tracing():
        return values.sort(dim=dim, descending=True)
    return values.sort(dim=dim, descending=True, stable=True)


def fast_nms(boxes: Tensor, scores: Tensor, iou_threshold: float, score_threshold: float,
             top_k: int, max_detections: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """YOLACT's Fast NMS, per class.

    ``boxes`` float [A, 4], ``scores`` float [A, C] (one column per foreground class).
    For each class the ``top_k`` best anchors are sorted (ties keep anchor order); in the
    upper-triangular IoU matrix X (X[i, j] for i < j only) detection j is dropped when
    ``max_i X[i, j] > iou_threshold``, i.e. when any better detection of the same class
    overlaps it, even one that is itself dropped (unlike greedy NMS). Classes never
    suppress each other. Returns at most ``max_detections`` ``(boxes [N, 4], scores [N],
    labels int64 [N] in 1..C, anchor index int64 [N])``, best first.
    """
    classes = scores.shape[1]
    ranked, order = sort_best_first(scores.t(), dim=1)
    ranked, order = ranked[:, :top_k], order[:, :top_k]  # [C, k]
    candidates = boxes[order]  # [C, k, 4]
    iou = torch.triu(pairwise_iou(candidates, candidates), diagonal=1)
    # a zero row first: the max is defined even for a class with no candidate
    iou = torch.cat([iou.new_zeros(classes, 1, iou.shape[2]), iou], dim=1)
    keep = (iou.max(dim=1).values <= iou_threshold) & (ranked > score_threshold)
    labels = torch.arange(1, classes + 1, device=scores.device)[:, None].expand_as(order)
    kept_scores, best = sort_best_first(ranked[keep])
    best = best[:max_detections]
    anchor_index = order[keep][best]
    return boxes[anchor_index], kept_scores[:max_detections], labels[keep][best], anchor_index


# --- masks ---------------------------------------------------------------------------------

def crop_masks(masks: Tensor, boxes: Tensor) -> Tensor:
    """``masks`` [N, H, W] zeroed outside ``boxes`` [N, 4] (xyxy in units of the mask's
    pixels): pixel (row i, column j) covers [j, j + 1) x [i, i + 1) and stays when it
    overlaps the box."""
    height, width = masks.shape[-2], masks.shape[-1]
    cols = torch.arange(width, dtype=boxes.dtype, device=masks.device)[None, None, :]
    rows = torch.arange(height, dtype=boxes.dtype, device=masks.device)[None, :, None]
    x1, y1, x2, y2 = (boxes[:, i, None, None] for i in range(4))
    # separable: a [N, 1, W] and a [N, H, 1] factor instead of four [N, H, W] comparisons
    inside_cols = ((cols + 1 > x1) & (cols < x2)).to(masks.dtype)
    inside_rows = ((rows + 1 > y1) & (rows < y2)).to(masks.dtype)
    return masks * inside_cols * inside_rows


def assemble_masks(prototypes: Tensor, coefficients: Tensor) -> Tensor:
    """YOLACT's linear combination: logits float [N, H, W] of ``prototypes`` [H, W, k]
    weighted by ``coefficients`` [N, k] (the sigmoid comes after)."""
    return torch.einsum("hwk,nk->nhw", prototypes, coefficients)


def resize_masks(masks: Tensor, size) -> Tensor:
    """Bilinear resize of float [N, H, W] to ``size`` (height, width)."""
    return F.interpolate(masks[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


# --- losses --------------------------------------------------------------------------------

def class_loss_ohem(logits: Tensor, labels: Tensor, negative_ratio: int) -> Tensor:
    """Summed softmax cross-entropy over positives and the hardest negatives.

    ``logits`` [A, C], ``labels`` int64 [A] (-1 neutral, 0 negative, > 0 positive). The
    negatives kept are the ``negative_ratio`` x #positives with the highest background
    loss (OHEM); neutral anchors never count.
    """
    positive = labels > 0
    background_loss = torch.logsumexp(logits, dim=1) - logits[:, 0]
    ranked = background_loss.detach().masked_fill(labels != 0, -1.0)
    wanted = min(negative_ratio * int(positive.sum()), int((labels == 0).sum()))
    negative = torch.zeros_like(positive)
    negative[ranked.topk(wanted).indices] = True
    chosen = positive | negative
    return F.cross_entropy(logits[chosen], labels[chosen], reduction="sum")


def box_area(boxes: Tensor) -> Tensor:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def mask_loss(logits: Tensor, targets: Tensor, boxes: Tensor,
              weights: Tensor | None = None) -> Tensor:
    """Sum over masks of the binary cross-entropy inside each ground-truth box, divided by
    the box's area (the paper's normalisation, so small objects count as much as large).

    ``logits``, ``targets`` float [P, h, w]; ``boxes`` [P, 4] in the masks' pixels;
    ``weights`` float [P] (optional): each mask's term is multiplied by its weight.
    """
    pixels = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    inside = crop_masks(pixels, boxes).sum(dim=(1, 2))
    per_mask = inside / box_area(boxes).clamp(min=1.0)
    return per_mask.sum() if weights is None else (per_mask * weights).sum()


def mask_iou(predicted: Tensor, targets: Tensor) -> Tensor:
    """IoU float [P] of bool masks [P, h, w] (0 where both are empty)."""
    inter = (predicted & targets).flatten(1).sum(1)
    union = (predicted | targets).flatten(1).sum(1)
    return inter.float() / union.clamp(min=1).float()


def semantic_targets(masks: Tensor, labels: Tensor, classes: int, size) -> Tensor:
    """float [classes, h, w]: per foreground class the union of its instances' masks
    (``masks`` float [K, H, W] in {0, 1}, ``labels`` 1..classes) resized to ``size``."""
    if masks.shape[0] == 0:
        return masks.new_zeros(classes, *size)
    small = (resize_masks(masks, size) > 0.5).to(masks.dtype)
    of_class = F.one_hot(labels - 1, classes).t().to(masks.dtype)  # [classes, K]
    return (of_class @ small.flatten(1)).clamp(max=1.0).reshape(classes, *size)
