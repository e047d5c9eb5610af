"""Labelled overlays (`viz.overlays.draw_labelled`): text and lines grow with the image."""
from __future__ import annotations

import numpy as np
import pytest

from instseg_pipeline.viz.overlays import MIN_LINE_WIDTH, draw_labelled, label_style, overlay_masks

CAPTION = "person 0.90"


def _scene(side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A grey square image, one square mask over its middle half and that mask's box."""
    image = np.full((side, side, 3), 90, np.uint8)
    masks = np.zeros((1, side, side), np.uint8)
    low, high = side // 4, 3 * side // 4
    masks[0, low:high, low:high] = 1
    return image, masks, np.array([[low, low, high, high]], np.float32)


def _label_extent(side: int) -> tuple[int, int]:
    """(height, width) in pixels of what the caption adds to the overlay."""
    image, masks, boxes = _scene(side)
    labelled = draw_labelled(image, masks, boxes, [CAPTION])
    unlabelled = draw_labelled(image, masks, boxes[:0], [])
    ys, xs = np.nonzero(np.abs(labelled.astype(int) - unlabelled).max(axis=-1))
    return int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)


def _outline_width(side: int) -> int:
    """Pixels the outline covers across the mask's left edge, half-way down."""
    image, masks, boxes = _scene(side)
    outlined = draw_labelled(image, masks, boxes[:0], [])
    tinted = np.round(overlay_masks(image / 255.0, masks) * 255).astype(int)
    changed = np.abs(outlined.astype(int) - tinted).max(axis=-1) > 40
    return int(changed[side // 2, : side // 2].sum())


def test_label_and_outline_grow_with_the_image():
    small, large = 400, 1600
    (h_small, w_small), (h_large, w_large) = _label_extent(small), _label_extent(large)
    assert 3.0 <= h_large / h_small <= 4.7, (h_small, h_large)
    assert 3.3 <= w_large / w_small <= 4.7, (w_small, w_large)
    assert h_large >= 0.025 * large  # still readable when the photo is shown shrunk
    line_small, line_large = _outline_width(small), _outline_width(large)
    assert line_small >= 1 and 3 <= line_large / line_small <= 6, (line_small, line_large)


def test_small_images_keep_legible_minimums():
    scale, width = label_style((48, 64, 3))
    assert width == MIN_LINE_WIDTH and scale == label_style((100, 100))[0]
    height, text_width = _label_extent(64)
    assert height >= 12 and text_width >= 40  # ~8 px letters, not a 2 px smear
    assert _outline_width(64) >= 1


def _tag_extent(x: float, y: float) -> tuple[int, int]:
    """(height, width) of the non-black pixels after tagging a black 200 x 260 image at
    (x, y)."""
    drawn = draw_labelled(np.zeros((200, 260, 3), np.uint8), np.zeros((1, 200, 260), np.uint8),
                          np.array([[x, y, x + 10, y + 10]], np.float32), ["a long caption"])
    ys, xs = np.nonzero(drawn.max(axis=-1))
    return int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)


@pytest.mark.parametrize("corner", [(0, 0), (255, 195), (-40, 300)])
def test_tag_is_moved_inside_the_image_whole(corner):
    assert _tag_extent(*corner) == _tag_extent(100, 100)  # not cut by the border
