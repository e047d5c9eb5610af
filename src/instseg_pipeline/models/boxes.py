"""Boxes from masks, for families without a box head (SOLOv2, SimpleSeg). Traceable: the
ONNX graphs of both families carry it, for any image size and any number of masks."""
from __future__ import annotations

import torch


def tight_boxes(masks: torch.Tensor) -> torch.Tensor:
    """float [N, 4] xyxy tight boxes of bool ``masks`` [N, H, W] (x2, y2 one past the last
    pixel); an empty mask gets a zero box."""
    _, height, width = masks.shape
    rows, cols = masks.any(2), masks.any(1)                 # [N, H], [N, W]
    ys = torch.arange(height, device=masks.device, dtype=torch.float32)
    xs = torch.arange(width, device=masks.device, dtype=torch.float32)
    big = float(2 ** 24)
    y1 = torch.where(rows, ys, big).min(1).values
    x1 = torch.where(cols, xs, big).min(1).values
    y2 = torch.where(rows, ys + 1, 0.0).max(1).values
    x2 = torch.where(cols, xs + 1, 0.0).max(1).values
    boxes = torch.stack([x1, y1, x2, y2], 1)
    empty = ~rows.any(1)
    return torch.where(empty[:, None], torch.zeros_like(boxes), boxes)
