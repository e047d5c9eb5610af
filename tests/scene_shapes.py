"""Hand-made masks and canonical ``instances`` rows for the tests' small scenes."""
from __future__ import annotations

import cv2
import numpy as np

from instseg_pipeline.data import masks


def rect(height: int, width: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """uint8 [height, width] mask of the box x0 <= x < x1, y0 <= y < y1."""
    mask = np.zeros((height, width), np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def circle(height: int, width: int, cx: int, cy: int, r: int) -> np.ndarray:
    """uint8 [height, width] mask of a filled circle."""
    mask = np.zeros((height, width), np.uint8)
    cv2.circle(mask, (cx, cy), r, 1, thickness=-1)
    return mask


def instance_row(instance_id: int, image_id: int, category_id: int, mask: np.ndarray,
                 iscrowd: bool = False) -> dict:
    """One ``instances`` (or ``stuff_segments``) row of ``mask``: its RLE, box and area."""
    rle = masks.bitmap_to_rle(mask)
    return {"instance_id": instance_id, "image_id": image_id, "category_id": category_id,
            "bbox": masks.rle_bbox(rle), "area": masks.rle_area(rle), "iscrowd": iscrowd,
            "rle": masks.rle_to_string(rle)}
