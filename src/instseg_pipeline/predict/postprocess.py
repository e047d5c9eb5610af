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

A semantic (panoptic) model's raw outputs also carry ``"semantic"`` int64 [H, W] (labels
0..S at the input size); `Detections.semantic` keeps it, and `stuff_segments` turns it into
the image's stuff segments with `predict.panoptic.combine_panoptic`, the evaluation's
panoptic merge: the kept instances paint first (best first, each keeping its free pixels,
dropped from the map when more than ``overlap_threshold`` of it is taken or fewer than
``min_area`` pixels stay free), then each stuff label takes its still-free pixels as one
segment when at least ``stuff_min_area`` remain (`PanopticOptions`). The instances
themselves stay as above: the merge only decides which pixels are left to stuff.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import cv2
import numpy as np

from instseg_pipeline.data.masks import bitmap_to_rle, rle_area, rle_bbox, rle_to_string
from instseg_pipeline.evaluation.config import PanopticConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Detections:
    """Instances of one image, best first.

    boxes float32 [N, 4] xyxy (the detector's), labels int64 [N], scores float32 [N],
    masks uint8 [N, H, W], rles: N compressed COCO RLE strings of the masks, areas int64
    [N] and bboxes float64 [N, 4] COCO x, y, w, h of the masks. ``semantic``: int64 [H, W]
    semantic labels 0..S of a semantic model (0 = things), None for an instance model.
    """

    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    masks: np.ndarray
    rles: list[str]
    areas: np.ndarray
    bboxes: np.ndarray
    semantic: np.ndarray | None = None

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


def semantic_map(raw: Mapping, height: int, width: int) -> np.ndarray | None:
    """int64 [H, W]: the ``"semantic"`` raw output, None when there is none; a map of
    another size than the masks' ``height`` x ``width`` is a `ValueError`."""
    if raw.get("semantic") is None:
        return None
    semantic = _numpy(raw["semantic"], np.int64)
    if semantic.shape != (height, width):
        raise ValueError(f"raw output 'semantic' has shape {tuple(semantic.shape)}, expected "
                         f"[{height}, {width}] (the masks' size)")
    return semantic


def postprocess(raw: Mapping, score_threshold: float, mask_threshold: float) -> Detections:
    """`Detections` of raw outputs ``{"boxes" [N, 4], "labels" [N], "scores" [N], "masks"
    [N, 1, H, W]}`` (numpy or torch; ``"semantic"`` [H, W] of a semantic model kept as it
    is), by the rules of the module docstring."""
    scores = _numpy(raw["scores"], np.float32).reshape(-1)
    order = ranked(scores, score_threshold)
    masks = binary_masks(raw["masks"], order, mask_threshold)
    semantic = semantic_map(raw, *raw["masks"].shape[-2:])
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
        bboxes=np.array([rle_bbox(rles[k]) for k in full], np.float64).reshape(-1, 4),
        semantic=semantic)


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


# --- stuff (semantic models) -----------------------------------------------------------------

_EVALUATION = PanopticConfig()


@dataclass(frozen=True)
class PanopticOptions:
    """How the stuff of a semantic model is cut out (`combine_panoptic`'s settings). The
    defaults are the evaluation's (``evaluation.panoptic`` in conf/base, `PanopticConfig`),
    so at the default score threshold 0.5 the stuff is the evaluation's panoptic map; an
    environment that changes them there (conf/coco_panoptic: stuff_min_area 4096) needs
    the same values here.

    - ``overlap_threshold``: a kept instance more than this fraction of whose mask better
      ones already took leaves its pixels to stuff (it is still listed among the
      instances);
    - ``min_area``: the fewest free pixels an instance must keep to claim them;
    - ``stuff_min_area``: the fewest free pixels a stuff label needs to become a segment
      (smaller regions stay void).
    """

    overlap_threshold: float = _EVALUATION.overlap_threshold
    min_area: int = _EVALUATION.min_area
    stuff_min_area: int = _EVALUATION.stuff_min_area

    def __post_init__(self):
        if not 0.0 <= self.overlap_threshold <= 1.0:
            raise ValueError(f"overlap_threshold must be in [0, 1], got {self.overlap_threshold}")
        for name in ("min_area", "stuff_min_area"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class StuffSegments:
    """Stuff segments of one image, by semantic label.

    category_ids int64 [M] (dataset stuff category ids), masks uint8 [M, H, W] (disjoint,
    and disjoint from the pixels the instances claim), rles: M compressed COCO RLE strings,
    areas int64 [M], bboxes float64 [M, 4] COCO x, y, w, h.
    """

    category_ids: np.ndarray
    masks: np.ndarray
    rles: list[str] = field(default_factory=list)
    areas: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    bboxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float64))

    def __len__(self) -> int:
        return len(self.category_ids)


def no_stuff(height: int, width: int) -> StuffSegments:
    """`StuffSegments` with none, for an image of ``height`` x ``width``."""
    return StuffSegments(np.zeros(0, np.int64), np.zeros((0, height, width), np.uint8))


def stuff_segments(found: Detections, label_to_category: Mapping[int, int],
                   stuff_category_ids: Mapping[int, int],
                   options: PanopticOptions = PanopticOptions()) -> StuffSegments:
    """The stuff segments of ``found`` (whose ``semantic`` map must be set): what
    `combine_panoptic` makes of its instances (all of them eligible: they already passed the
    score threshold) and its semantic map. ``label_to_category``: model label -> thing
    category id; ``stuff_category_ids``: semantic label 1..S -> stuff category id."""
    from instseg_pipeline.predict.panoptic import combine_panoptic

    height, width = found.size
    if found.semantic is None:
        return no_stuff(height, width)
    things = np.array([label_to_category.get(int(k), int(k)) for k in found.labels], np.int64)
    # -inf: every instance of `found` is a kept one, whatever threshold kept it
    id_map, segments = combine_panoptic(
        found.masks, found.scores, things, found.semantic, stuff_category_ids,
        score_threshold=float("-inf"), overlap_threshold=options.overlap_threshold,
        min_area=options.min_area, stuff_min_area=options.stuff_min_area)
    stuff = [s for s in segments if "score" not in s]
    if not stuff:
        return no_stuff(height, width)
    masks = np.stack([(id_map == s["id"]).astype(np.uint8) for s in stuff])
    rles = [bitmap_to_rle(mask) for mask in masks]
    return StuffSegments(
        category_ids=np.array([s["category_id"] for s in stuff], np.int64), masks=masks,
        rles=[rle_to_string(rle) for rle in rles],
        areas=np.array([rle_area(rle) for rle in rles], np.int64),
        bboxes=np.array([rle_bbox(rle) for rle in rles], np.float64).reshape(-1, 4))


def stuff_dicts(stuff: StuffSegments, names: Mapping[int, str],
                polygons: bool = False) -> list[dict]:
    """JSON-ready stuff segments: category_id, category_name (``names``: category id ->
    name), bbox (COCO x, y, w, h), area, rle ``{"size": [H, W], "counts"}``; with
    ``polygons`` also polygon (`mask_polygons`: outer contours, so the holes the instances
    leave are not in it; the RLE is exact)."""
    size = [int(stuff.masks.shape[1]), int(stuff.masks.shape[2])]
    out = []
    for k, category_id in enumerate(stuff.category_ids):
        segment = {"category_id": int(category_id),
                   "category_name": names.get(int(category_id), str(int(category_id))),
                   "bbox": stuff.bboxes[k].tolist(), "area": int(stuff.areas[k]),
                   "rle": {"size": size, "counts": stuff.rles[k]}}
        if polygons:
            segment["polygon"] = mask_polygons(stuff.masks[k])
        out.append(segment)
    return out
