"""Click-to-segment: masks from positive / negative points and an optional box.

Who answers (the result's ``method``):
- ``sam``: a Segment Anything model, when one is configured (`load_sam`, `sam_from_env`);
- ``model``: otherwise the trained model's instances that cover a positive point and no
  negative point (and lie mostly inside the box, when one is given);
- ``grabcut``: where no such instance exists, OpenCV GrabCut seeded by the prompts.

SAM building and loading (checkpoint formats, config keys) live in `predict.sam`, shared
with the ``sam`` pseudo-masks of box-only data; their names are imported here as before.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import cv2
import numpy as np

from instseg_pipeline.predict.predictor import Predictor
from instseg_pipeline.predict.sam import (  # noqa: F401  (the serving code's names for them)
    SAM_DEFAULTS,
    SAM_PRESETS,
    SamSegmenter,
    build_sam,
    load_sam,
    sam_config,
    sam_from_env,
)

logger = logging.getLogger(__name__)

GRABCUT_MAX_SIDE = 512  # GrabCut is O(pixels x iterations): work on a downscaled copy
GRABCUT_ITERATIONS = 5
BOX_INSIDE_FRACTION = 0.5
# a person clicks a handful of points; the model answer and GrabCut cost grows with each
# (a pixel lookup per mask, a disk per seed), so a request may not send thousands
MAX_PROMPT_POINTS = 64


class PromptError(ValueError):
    """Prompts that cannot be used; ``field`` (points, labels, box) names the culprit."""

    def __init__(self, message: str, field: str = "points"):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Prompts:
    """points float32 [K, 2] (x, y pixels), labels int64 [K] (1 keep, 0 exclude),
    box float32 [4] x1, y1, x2, y2 or None."""

    points: np.ndarray
    labels: np.ndarray
    box: np.ndarray | None = None

    @property
    def positive(self) -> np.ndarray:
        return self.points[self.labels == 1]

    @property
    def negative(self) -> np.ndarray:
        return self.points[self.labels == 0]


@dataclass(frozen=True)
class InteractiveResult:
    """masks uint8 [M, H, W], scores float32 [M], labels (model label or None) per mask."""

    masks: np.ndarray
    scores: np.ndarray
    method: str
    labels: list


# --- prompt parsing -----------------------------------------------------------------------------

def _json_field(name: str, text: str | None):
    if text is None or text.strip() == "":
        return None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise PromptError(f"{name} is not valid JSON ({exc.msg} at character {exc.pos})",
                          name) from None
    except RecursionError:
        # "[[[[..." a few thousand deep exhausts the decoder's stack: a 422, not a 500
        raise PromptError(f"{name} is nested too deeply to be prompts", name) from None


def _number_array(name: str, value, shape_text: str) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise PromptError(f"{name} must be {shape_text} of numbers, got {value!r:.80}",
                          name) from None
    if not np.isfinite(array).all():
        raise PromptError(f"{name} holds a non-finite number", name)
    return array


def _check_count(points, labels, max_points: int) -> None:
    """Refuse more than ``max_points`` points (or labels) before any array is built."""
    for name, value in (("points", points), ("labels", labels)):
        if isinstance(value, list) and len(value) > max_points:
            raise PromptError(f"{name} has {len(value)} entries, over the limit of "
                              f"{max_points} prompt points (max_points)", name)


def _parse_points(points, labels, max_points: int = MAX_PROMPT_POINTS
                  ) -> tuple[np.ndarray, np.ndarray]:
    points = [] if points is None else points
    labels = [] if labels is None else labels
    _check_count(points, labels, max_points)
    array = _number_array("points", points, "a list of [x, y] pairs")
    if array.size == 0:
        array = array.reshape(0, 2)
    if array.ndim != 2 or array.shape[1] != 2:
        raise PromptError(f"points must be a list of [x, y] pairs, got shape {list(array.shape)}")
    if not isinstance(labels, list) or any(v not in (0, 1) or isinstance(v, bool)
                                           for v in labels):
        raise PromptError(f"labels must be a list of 0 (exclude) or 1 (include), "
                          f"got {labels!r:.80}", "labels")
    if len(labels) != len(array):
        raise PromptError(f"labels has {len(labels)} entries but points has {len(array)}",
                          "labels")
    return array.astype(np.float32), np.asarray(labels, dtype=np.int64)


def _parse_box(box) -> np.ndarray | None:
    if box is None:
        return None
    array = _number_array("box", box, "[x1, y1, x2, y2]")
    if array.shape != (4,):
        raise PromptError(f"box must be one [x1, y1, x2, y2], got shape "
                          f"{list(array.shape)}", "box")
    if not (array[0] < array[2] and array[1] < array[3]):
        raise PromptError(f"box {array.tolist()} must have x1 < x2 and y1 < y2", "box")
    return array.astype(np.float32)


def parse_prompts(points: str | None, labels: str | None, box: str | None = None,
                  max_points: int = MAX_PROMPT_POINTS) -> Prompts:
    """`Prompts` from JSON texts: points ``[[x, y], ...]``, labels ``[1, 0, ...]``, box
    (one ``[x1, y1, x2, y2]``).

    Raises `PromptError` for invalid JSON, wrong shapes, more than ``max_points`` points or
    labels, labels other than 0/1, a length mismatch, or neither a positive point nor a box.
    """
    pts, labs = _parse_points(_json_field("points", points), _json_field("labels", labels),
                              max_points)
    parsed = Prompts(pts, labs, _parse_box(_json_field("box", box)))
    if parsed.box is None and len(parsed.positive) == 0:
        raise PromptError("give at least one positive point (label 1) or a box")
    return parsed


def check_inside(prompts: Prompts, width: int, height: int) -> None:
    """Raise `PromptError` when a point or the box leaves the ``width`` x ``height`` image."""
    for (x, y), label in zip(prompts.points.tolist(), prompts.labels.tolist()):
        if not (0 <= x < width and 0 <= y < height):
            raise PromptError(f"point [{x:g}, {y:g}] (label {label}) is outside the "
                              f"{width}x{height} image")
    if prompts.box is not None:
        x1, y1, x2, y2 = prompts.box.tolist()
        if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
            raise PromptError(f"box {[x1, y1, x2, y2]} is outside the {width}x{height} image",
                              "box")


# --- trained-model and GrabCut answers ----------------------------------------------------------

def _pixels(points: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    xs = np.clip(np.floor(points[:, 0]).astype(int), 0, width - 1)
    ys = np.clip(np.floor(points[:, 1]).astype(int), 0, height - 1)
    return ys, xs


def _inside_box(mask: np.ndarray, box: np.ndarray) -> float:
    """Fraction of the mask's pixels inside ``box``."""
    x1, y1, x2, y2 = (round(float(v)) for v in box)
    total = int(mask.sum())
    return float(mask[y1:y2, x1:x2].sum()) / total if total else 0.0


def select_instances(masks: np.ndarray, prompts: Prompts) -> np.ndarray:
    """Indices of ``masks`` uint8 [N, H, W] under a positive point and no negative point."""
    height, width = masks.shape[1:]
    keep = np.ones(len(masks), dtype=bool)
    if len(prompts.positive):
        keep &= masks[(slice(None), *_pixels(prompts.positive, height, width))].any(axis=1)
    if len(prompts.negative):
        keep &= ~masks[(slice(None), *_pixels(prompts.negative, height, width))].any(axis=1)
    if prompts.box is not None:
        keep &= np.array([_inside_box(m, prompts.box) >= BOX_INSIDE_FRACTION for m in masks],
                         dtype=bool)
    return np.flatnonzero(keep)


def _grabcut_seed(shape: tuple[int, int], prompts: Prompts, scale: float) -> np.ndarray:
    """GrabCut mask uint8 [h, w]: sure fg/bg disks at the points, probable fg near them."""
    height, width = shape
    seed = np.full(shape, cv2.GC_PR_BGD, np.uint8)
    if prompts.box is not None:
        x1, y1, x2, y2 = (round(float(v) * scale) for v in prompts.box)
        seed[:] = cv2.GC_BGD
        seed[y1:max(y2, y1 + 1), x1:max(x2, x1 + 1)] = cv2.GC_PR_FGD
    else:
        # no box: the object is assumed to lie near its positive points
        margin = max(8, int(0.15 * max(shape)))
        x1, y1 = (prompts.positive.min(axis=0) * scale).astype(int) - margin
        x2, y2 = (prompts.positive.max(axis=0) * scale).astype(int) + margin
        seed[max(y1, 0):y2, max(x1, 0):x2] = cv2.GC_PR_FGD
    # GrabCut needs background samples: the image border is at least probable background
    for edge in (seed[0], seed[-1], seed[:, 0], seed[:, -1]):
        edge[edge == cv2.GC_PR_FGD] = cv2.GC_PR_BGD
    radius = max(2, round(0.01 * max(shape)))
    for points, value in ((prompts.negative, cv2.GC_BGD), (prompts.positive, cv2.GC_FGD)):
        for x, y in (points * scale).astype(int).tolist():
            cv2.circle(seed, (min(x, width - 1), min(y, height - 1)), radius, int(value), -1)
    return seed


def _keep_prompted_components(mask: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Only the connected parts of ``mask`` uint8 [H, W] that hold a positive point."""
    if len(positive) == 0:
        return mask
    _, components = cv2.connectedComponents(mask, connectivity=8)
    ids = components[_pixels(positive, *mask.shape)]
    return np.isin(components, ids[ids > 0]).astype(np.uint8)


def grabcut_mask(image: np.ndarray, prompts: Prompts,
                 iterations: int = GRABCUT_ITERATIONS) -> np.ndarray:
    """uint8 [H, W] foreground of ``image`` uint8 [H, W, 3] RGB segmented by GrabCut."""
    height, width = image.shape[:2]
    scale = min(1.0, GRABCUT_MAX_SIDE / max(height, width))
    small = cv2.resize(image, (max(1, round(width * scale)), max(1, round(height * scale))),
                       interpolation=cv2.INTER_AREA) if scale < 1 else image
    seed = _grabcut_seed(small.shape[:2], prompts, scale)
    background, foreground = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.grabCut(np.ascontiguousarray(small[..., ::-1]), seed, None, background, foreground,
                iterations, cv2.GC_INIT_WITH_MASK)
    mask = np.isin(seed, (cv2.GC_FGD, cv2.GC_PR_FGD)).astype(np.uint8)
    if scale < 1:
        mask = cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)
    return _keep_prompted_components(mask, prompts.positive)


def prompt_agreement(mask: np.ndarray, prompts: Prompts) -> float:
    """Fraction of the points that ``mask`` honours (positive inside, negative outside)."""
    if len(prompts.points) == 0:
        return 1.0
    inside = mask[_pixels(prompts.points, *mask.shape)].astype(bool)
    return float(np.mean(inside == (prompts.labels == 1)))


class InteractiveSegmenter:
    """Answers prompts with SAM when given one, else the trained model, else GrabCut."""

    def __init__(self, predictor: Predictor | None, sam: SamSegmenter | None = None):
        if predictor is None and sam is None:
            raise ValueError("interactive segmentation needs a trained model or a SAM model")
        self.predictor = predictor
        self.sam = sam

    @property
    def methods(self) -> list[str]:
        return ["sam"] if self.sam is not None else ["model", "grabcut"]

    def segment(self, image: np.ndarray, prompts: Prompts, score_threshold: float = 0.5,
                mask_threshold: float = 0.5) -> InteractiveResult:
        """Masks for ``prompts`` on ``image`` uint8 [H, W, 3] RGB, best first."""
        check_inside(prompts, image.shape[1], image.shape[0])
        if self.sam is not None:
            masks, scores = self.sam(image, prompts)
            return InteractiveResult(masks, scores, "sam", [None] * len(masks))
        found = self.predictor.detect(image, score_threshold, mask_threshold)
        chosen = select_instances(found.masks, prompts)
        if len(chosen):
            return InteractiveResult(found.masks[chosen], found.scores[chosen], "model",
                                     [int(v) for v in found.labels[chosen]])
        mask = grabcut_mask(image, prompts)
        score = np.array([prompt_agreement(mask, prompts)], np.float32)
        return InteractiveResult(mask[None], score, "grabcut", [None])
