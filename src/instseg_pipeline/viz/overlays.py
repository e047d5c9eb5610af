"""Masks tinted over an image (numpy and OpenCV, no matplotlib): the overlay every entry point
draws with (`viz.training`, `instseg-predict`, the demo, the notebooks), and the labelled
overlay written at the image's own resolution (`draw_labelled`)."""
from __future__ import annotations

import cv2
import numpy as np

_COLORS = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
                    [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230],
                    [210, 245, 60], [250, 190, 212]], dtype=np.float32) / 255.0

# Label text height and line width as fractions of the image's shorter side, with floors that
# keep small images legible: a 256 px image gets ~8 px text and 1 px lines, a 4000 px photo
# ~100 px text and 10 px lines instead of the same 8 px.
FONT = cv2.FONT_HERSHEY_SIMPLEX
TEXT_HEIGHT_FRACTION = 0.025
LINE_WIDTH_FRACTION = 0.0025
MIN_FONT_SCALE = 0.35
MIN_LINE_WIDTH = 1
_SCALE_ONE_HEIGHT = cv2.getTextSize("Ag", FONT, 1.0, 1)[0][1]  # text height at scale 1, px


def overlay_masks(image: np.ndarray, masks: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """float32 [H, W, 3]: float ``image`` [H, W, 3] in [0, 1] with uint8 [N, H, W] masks tinted."""
    out = image.astype(np.float32).copy()
    for k, mask in enumerate(masks):
        region = mask.astype(bool)
        out[region] = (1 - alpha) * out[region] + alpha * _COLORS[k % len(_COLORS)]
    return out


def inner_point(mask: np.ndarray) -> tuple[int, int]:
    """(x, y) of the pixel of ``mask`` uint8 [H, W] farthest from its border (a label there
    sits on the segment even when it is not convex); ``mask`` must not be empty."""
    padded = np.pad(mask.astype(np.uint8), 1)  # the image edge is a border too
    distance = cv2.distanceTransform(padded, cv2.DIST_L2, 3)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return int(x), int(y)


def label_style(shape: tuple[int, ...]) -> tuple[float, int]:
    """(OpenCV font scale, line width in pixels) for an image of ``shape`` (H, W, ...):
    proportional to the shorter side, never below `MIN_FONT_SCALE` / `MIN_LINE_WIDTH`."""
    side = min(shape[:2])
    scale = max(MIN_FONT_SCALE, TEXT_HEIGHT_FRACTION * side / _SCALE_ONE_HEIGHT)
    return scale, max(MIN_LINE_WIDTH, round(LINE_WIDTH_FRACTION * side))


def color_bytes(k: int) -> tuple[int, int, int]:
    """RGB 0..255 of instance ``k``'s colour (the one `overlay_masks` tints it with)."""
    return tuple(round(float(c) * 255) for c in _COLORS[k % len(_COLORS)])


def draw_labelled(image: np.ndarray, masks: np.ndarray, boxes: np.ndarray,
                  captions: list[str]) -> np.ndarray:
    """uint8 [H, W, 3]: ``image`` uint8 [H, W, 3] with masks uint8 [N, H, W] tinted and
    outlined, and each caption on a tag of its colour at its box's top-left corner.

    boxes: float [N, 4] x1, y1, x2, y2 in pixels. Text and lines follow `label_style`.
    """
    picture = overlay_masks(image.astype(np.float32) / 255.0, masks)
    canvas = np.clip(np.round(picture * 255.0), 0, 255).astype(np.uint8)
    scale, width = label_style(canvas.shape)
    for k, mask in enumerate(masks):
        contours, _ = cv2.findContours(np.ascontiguousarray(mask, dtype=np.uint8),
                                       cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(canvas, contours, -1, color_bytes(k), width, cv2.LINE_AA)
    # tags after every outline, so no outline crosses a tag
    for k, (box, text) in enumerate(zip(boxes, captions)):
        _tag(canvas, text, float(box[0]), float(box[1]), color_bytes(k), scale, width)
    return canvas


def _tag(canvas: np.ndarray, text: str, x: float, y: float, rgb: tuple, scale: float,
         thickness: int) -> None:
    """``text`` on a filled ``rgb`` tag just above (x, y), or below it at the top edge, kept
    inside ``canvas`` uint8 [H, W, 3]; drawn in place."""
    (width, height), baseline = cv2.getTextSize(text, FONT, scale, thickness)
    pad = thickness + 1
    box_w, box_h = width + 2 * pad, height + baseline + 2 * pad
    left = int(np.clip(x, 0, max(canvas.shape[1] - box_w, 0)))
    top = int(np.clip(y - box_h if y >= box_h else y, 0, max(canvas.shape[0] - box_h, 0)))
    cv2.rectangle(canvas, (left, top), (left + box_w - 1, top + box_h - 1), rgb, -1)
    # dark ink on the light colours (yellow, cyan, lime), white on the others
    ink = (0, 0, 0) if np.dot(rgb, (0.299, 0.587, 0.114)) > 150 else (255, 255, 255)
    cv2.putText(canvas, text, (left + pad, top + pad + height), FONT, scale, ink, thickness,
                cv2.LINE_AA)
