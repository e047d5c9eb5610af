"""Masks tinted over an image (numpy only): the overlay every entry point draws with
(`viz.training`, `instseg-predict`, the demo, the notebooks)."""
from __future__ import annotations

import numpy as np

_COLORS = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
                    [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230],
                    [210, 245, 60], [250, 190, 212]], dtype=np.float32) / 255.0


def overlay_masks(image: np.ndarray, masks: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """float32 [H, W, 3]: float ``image`` [H, W, 3] in [0, 1] with uint8 [N, H, W] masks tinted."""
    out = image.astype(np.float32).copy()
    for k, mask in enumerate(masks):
        region = mask.astype(bool)
        out[region] = (1 - alpha) * out[region] + alpha * _COLORS[k % len(_COLORS)]
    return out
