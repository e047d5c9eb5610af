"""Simple mask metrics: IoU of matched instance masks, pixel accuracy and per-class IoU.

Instance masks are compared as COCO RLEs (pycocotools ``iou``), which is exact and far
cheaper than bitmap arithmetic for many masks; bitmaps are encoded on the way in.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pycocotools import mask as mask_utils
from scipy.optimize import linear_sum_assignment

from instseg_pipeline.evaluation import MetricInputError

MATCH_METHODS = ("hungarian", "greedy")


@dataclass(frozen=True)
class MaskMatch:
    """Matched pairs, sorted by prediction index.

    pred_index: int64 [K]; gt_index: int64 [K]; iou: float64 [K].
    """

    pred_index: np.ndarray
    gt_index: np.ndarray
    iou: np.ndarray

    @property
    def mean_iou(self) -> float:
        """Mean IoU of the matched pairs (nan when nothing matched)."""
        return float(np.mean(self.iou)) if self.iou.size else float("nan")


def to_rles(masks) -> list[dict]:
    """Compressed RLEs of uint8/bool [N, H, W] bitmaps; a list of RLE dicts passes through."""
    if isinstance(masks, (list, tuple)):
        return list(masks)
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise MetricInputError(f"masks must be [N, H, W], got shape {masks.shape}")
    if masks.shape[0] == 0:
        return []
    return mask_utils.encode(np.asfortranarray(np.transpose(masks != 0, (1, 2, 0)), np.uint8))


def mask_iou_matrix(pred, gt, gt_crowd=None) -> np.ndarray:
    """float64 [P, G] IoU between predicted and GT masks of one image.

    pred, gt: uint8 [N, H, W] bitmaps or lists of COCO RLE dicts (same image size).
    gt_crowd: bool [G] or None; for a crowd GT the IoU is intersection / prediction area,
    the COCO rule that lets one crowd region absorb many predictions.
    """
    pred_rles, gt_rles = to_rles(pred), to_rles(gt)
    if not pred_rles or not gt_rles:
        return np.zeros((len(pred_rles), len(gt_rles)), dtype=np.float64)
    _check_same_size(pred_rles, gt_rles)
    crowd = np.zeros(len(gt_rles), np.uint8) if gt_crowd is None else np.asarray(gt_crowd, np.uint8)
    if crowd.shape != (len(gt_rles),):
        raise MetricInputError(f"gt_crowd has shape {crowd.shape}, expected ({len(gt_rles)},)")
    return np.asarray(mask_utils.iou(pred_rles, gt_rles, list(crowd)), dtype=np.float64)


def match_masks(pred, gt, scores=None, iou_threshold: float = 0.5,
                method: str = "hungarian") -> MaskMatch:
    """One-to-one matching of predicted to GT masks of one image by IoU.

    pred, gt: uint8 [N, H, W] bitmaps or lists of COCO RLE dicts.
    scores: float [P], needed by ``greedy`` (highest score picks first, as COCO does).
    ``hungarian`` maximizes the total IoU (scipy linear_sum_assignment). Pairs whose IoU
    is below ``iou_threshold`` (or 0) are not matches.
    """
    ious = mask_iou_matrix(pred, gt)
    if method == "hungarian":
        rows, cols = _hungarian(ious, iou_threshold)
    elif method == "greedy":
        rows, cols = _greedy(ious, _scores(scores, ious.shape[0]), iou_threshold)
    else:
        raise MetricInputError(f"method {method!r} is not one of {', '.join(MATCH_METHODS)}")
    order = np.argsort(rows, kind="stable")
    rows, cols = rows[order], cols[order]
    return MaskMatch(rows, cols, ious[rows, cols])


def _hungarian(ious: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = linear_sum_assignment(ious, maximize=True)
    keep = _acceptable(ious[rows, cols], threshold)
    return rows[keep].astype(np.int64), cols[keep].astype(np.int64)


def _greedy(ious: np.ndarray, scores: np.ndarray,
            threshold: float) -> tuple[np.ndarray, np.ndarray]:
    taken = np.zeros(ious.shape[1], dtype=bool)
    rows, cols = [], []
    for row in np.argsort(-scores, kind="stable"):
        candidates = np.where(taken, -1.0, ious[row])
        col = int(np.argmax(candidates)) if candidates.size else -1
        if col >= 0 and _acceptable(candidates[col], threshold):
            taken[col] = True
            rows.append(row)
            cols.append(col)
    return np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)


def _acceptable(iou, threshold: float):
    return (iou >= threshold) & (iou > 0)


def _scores(scores, count: int) -> np.ndarray:
    if scores is None:
        raise MetricInputError("greedy matching needs the prediction scores")
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (count,):
        raise MetricInputError(f"scores have shape {scores.shape}, expected ({count},)")
    return scores


def _check_same_size(pred_rles: list[dict], gt_rles: list[dict]) -> None:
    sizes = {tuple(int(v) for v in rle["size"]) for rle in pred_rles + gt_rles}
    if len(sizes) > 1:
        raise MetricInputError(f"masks of one image must share a size, got {sorted(sizes)}")


def pixel_accuracy(pred: np.ndarray, target: np.ndarray, ignore_index: int | None = None) -> float:
    """Fraction of pixels where two semantic maps agree.

    pred, target: integer class maps [H, W] (or any equal shape); pixels where
    ``target == ignore_index`` are left out. nan when no pixel counts.
    """
    pred, target = _same_shape(pred, target)
    valid = np.ones(target.shape, bool) if ignore_index is None else target != ignore_index
    counted = int(valid.sum())
    return float((pred[valid] == target[valid]).sum() / counted) if counted else float("nan")


def semantic_iou(pred: np.ndarray, target: np.ndarray, num_classes: int,
                 ignore_index: int | None = None) -> np.ndarray:
    """float64 [num_classes] IoU per class of two semantic maps (nan where a class is absent
    from both). pred, target: integer class maps in [0, num_classes)."""
    pred, target = _same_shape(pred, target)
    valid = np.ones(target.shape, bool) if ignore_index is None else target != ignore_index
    pred, target = pred[valid].astype(np.int64), target[valid].astype(np.int64)
    for name, values in (("pred", pred), ("target", target)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise MetricInputError(f"{name} has class ids outside [0, {num_classes})")
    confusion = np.bincount(target * num_classes + pred, minlength=num_classes ** 2)
    confusion = confusion.reshape(num_classes, num_classes)
    inter = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, np.nan)


def _same_shape(pred, target) -> tuple[np.ndarray, np.ndarray]:
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape:
        raise MetricInputError(f"pred shape {pred.shape} differs from target shape {target.shape}")
    return pred, target
