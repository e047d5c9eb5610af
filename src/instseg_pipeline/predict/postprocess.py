"""The one postprocessing of every entry point: raw outputs of one image -> its instances.

Rules (the evaluation convention, so the evaluation metrics are what they always were):
- an instance is kept when ``score >= score_threshold``;
- a mask pixel is foreground when ``probability >= mask_threshold``;
- an instance whose mask is empty at that threshold is dropped (nothing to score or show);
- instances are ordered best score first; equal scores keep the model's order;
- masks travel as compressed COCO RLE of the full-size mask, and ``bbox`` (COCO x, y, w, h)
  and ``area`` are those of the mask, as in the predictions table; ``box`` stays the
  detector's box (xyxy, sub-pixel).

`Detections` feeds both the predictions table (`table_rows`) and the JSON instances of the
predictor and the HTTP API (`instance_dicts`).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import cv2
import numpy as np

from instseg_pipeline.data.masks import bitmap_to_rle, rle_area, rle_bbox, rle_to_string

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Detections:
    """Instances of one image, best first.

    boxes float32 [N, 4] xyxy (the detector's), labels int64 [N], scores float32 [N],
    masks uint8 [N, H, W], rles: N compressed COCO RLE strings of the masks, areas int64
    [N] and bboxes float64 [N, 4] COCO x, y, w, h of the masks.
    """

    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    masks: np.ndarray
    rles: list[str]
    areas: np.ndarray
    bboxes: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the image (and of every mask)."""
        return int(self.masks.shape[1]), int(self.masks.shape[2])


def _numpy(values, dtype) -> np.ndarray:
    """``values`` (numpy, or a torch tensor on any device) as a numpy array of ``dtype``."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values).astype(dtype, copy=False)


def ranked(scores: np.ndarray, score_threshold: float) -> np.ndarray:
    """int64 [K]: indices of ``scores`` float32 [N] that are >= the threshold, best first
    (a stable sort: ties keep the model's order)."""
    keep = np.flatnonzero(scores >= score_threshold)
    return keep[np.argsort(-scores[keep], kind="stable")]


def binary_masks(masks, order: np.ndarray, mask_threshold: float) -> np.ndarray:
    """uint8 [K, H, W]: ``masks`` float [N, 1, H, W] probabilities at ``order``, thresholded
    with ``>=``. Torch masks are thresholded where they are (a GPU sends back bits only)."""
    picked = masks[order.tolist(), 0] if hasattr(masks, "detach") else masks[order, 0]
    return _numpy(picked >= mask_threshold, np.uint8)


def postprocess(raw: Mapping, score_threshold: float, mask_threshold: float) -> Detections:
    """`Detections` of raw outputs ``{"boxes" [N, 4], "labels" [N], "scores" [N], "masks"
    [N, 1, H, W]}`` (numpy or torch), by the rules of the module docstring."""
    scores = _numpy(raw["scores"], np.float32).reshape(-1)
    order = ranked(scores, score_threshold)
    masks = binary_masks(raw["masks"], order, mask_threshold)
    rles = [bitmap_to_rle(mask) for mask in masks]
    areas = np.array([rle_area(rle) for rle in rles], np.int64)
    full = np.flatnonzero(areas > 0)
    if len(full) < len(order):
        logger.debug("%d of %d instances dropped: empty mask at threshold %s",
                     len(order) - len(full), len(order), mask_threshold)
    order = order[full]
    return Detections(
        boxes=_numpy(raw["boxes"], np.float32).reshape(-1, 4)[order],
        labels=_numpy(raw["labels"], np.int64).reshape(-1)[order],
        scores=scores[order], masks=masks[full],
        rles=[rle_to_string(rles[k]) for k in full], areas=areas[full],
        bboxes=np.array([rle_bbox(rles[k]) for k in full], np.float64).reshape(-1, 4))


def table_rows(found: Detections, image_id: int, label_to_category: Mapping[int, int]
               ) -> list[dict]:
    """Rows of the predictions table for one image (prediction_id is the caller's)."""
    height, width = found.size
    return [{"image_id": int(image_id), "category_id": int(label_to_category[int(label)]),
             "label": int(label), "score": float(score), "bbox": bbox.tolist(),
             "area": int(area), "rle": rle, "height": height, "width": width}
            for label, score, bbox, area, rle in zip(found.labels, found.scores, found.bboxes,
                                                     found.areas, found.rles)]


def mask_polygons(mask: np.ndarray) -> list[list[float]]:
    """COCO polygon parts ``[[x1, y1, x2, y2, ...], ...]`` of the outer contours of ``mask``."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
    return [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]


def instance_dicts(found: Detections, classes: Mapping[int, str],
                   polygons: bool = False) -> list[dict]:
    """JSON-ready instances: label, category_name, score, box (the detector's xyxy), bbox
    (COCO x, y, w, h of the mask), area, rle ``{"size": [H, W], "counts"}``; with
    ``polygons`` also polygon (`mask_polygons`)."""
    size = list(found.size)
    out = []
    for k, (label, score, box) in enumerate(zip(found.labels, found.scores, found.boxes)):
        instance = {"label": int(label), "category_name": classes.get(int(label), str(label)),
                    "score": float(score), "box": [float(v) for v in box],
                    "bbox": found.bboxes[k].tolist(), "area": int(found.areas[k]),
                    "rle": {"size": size, "counts": found.rles[k]}}
        if polygons:
            instance["polygon"] = mask_polygons(found.masks[k])
        out.append(instance)
    return out
