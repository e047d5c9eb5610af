"""The one preprocessing of every entry point (batch prediction, the predictor, export
tracing, parity and latency, the torch Dataset): uint8 RGB ``[H, W, 3]`` -> float32
``[3, H, W]`` in [0, 1] at the image's own size.

Nothing else happens here on purpose: resizing and normalisation are inside the network
(and so inside the exported graph), so every backend sees the same numbers.
"""
from __future__ import annotations

import numpy as np


def to_chw(image: np.ndarray) -> np.ndarray:
    """uint8 RGB ``[H, W, 3]`` -> a fresh, writable float32 ``[3, H, W]`` in [0, 1].

    Raises ValueError for any other dtype or shape (the message shows both).
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    # a copy, never a view: Pillow hands out read-only arrays, which torch warns about
    chw = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)
    chw /= np.float32(255)
    return chw


def to_tensor(image: np.ndarray):
    """`to_chw` as a CPU torch float32 tensor ``[3, H, W]`` (sharing the fresh array)."""
    import torch

    return torch.from_numpy(to_chw(image))
