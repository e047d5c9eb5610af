"""Tiny models and images shared by the predict, export, serving and command tests.

- an untrained ``maskrcnn_tiny`` that still detects (`tiny_model_dict`, `save_checkpoint`,
  `export_tiny_onnx`) and a noisy `scene` with a disk and a square;
- generated shapes on black with their training targets (`shapes_scene`) and `train_heads`,
  which trains a tiny Mask R-CNN's ROI heads on them in seconds: enough for confident
  detections on shapes, none on a black image, and decisive masks;
- PNG encoders for uploads (`png_bytes`, `png_header_only`);
- `one_thread`, a module-scoped fixture for modules that time or trace tiny models.
"""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from instseg_pipeline.models import build_model, model_config
from instseg_pipeline.predict.preprocess import to_tensor


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a small shared CPU, more threads can run 10x slower, not faster.
    Autouse in a module that imports it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CLASSES = {1: "disk", 2: "square"}
TINY_PARAMS = {"name": "maskrcnn_tiny", "min_size": 224, "max_size": 256,
               "box_score_thresh": 0.0, "box_detections_per_img": 20}
EXPORT_SIZE = (200, 240)  # (H, W): the network resizes it by 256 / 240, away from rounding ties


def tiny_model_dict(seed: int = 0) -> dict:
    """An untrained maskrcnn_tiny as the training pipeline saves it (it still detects)."""
    torch.manual_seed(seed)
    num_classes = len(CLASSES) + 1
    network = build_model(TINY_PARAMS, num_classes)
    return {"config": model_config(TINY_PARAMS, num_classes), "state_dict": network.state_dict(),
            "classes": dict(CLASSES), "iterations": 7}


def save_checkpoint(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tiny_model_dict(seed), path)
    return path


def export_tiny_onnx(model_dict: dict, path: Path) -> Path:
    """``<path>`` ONNX + manifest through the project's exporter (`export.onnx.export_onnx`)."""
    from instseg_pipeline.export.onnx import export_onnx
    from instseg_pipeline.models import load_model

    network = load_model(model_dict["config"], model_dict["state_dict"]).eval()
    export_onnx(network, path, opset=17, example_size=EXPORT_SIZE,
                classes=model_dict["classes"], config=model_dict["config"],
                iterations=model_dict["iterations"])
    return path


def scene(height: int = 192, width: int = 256, seed: int = 0) -> np.ndarray:
    """uint8 [H, W, 3]: a noisy background with a bright disk and a dark square."""
    rng = np.random.default_rng(seed)
    image = rng.integers(60, 120, size=(height, width, 3), dtype=np.uint8)
    ys, xs = np.mgrid[:height, :width]
    image[(ys - height // 2) ** 2 + (xs - width // 3) ** 2 < (height // 5) ** 2] = (240, 200, 40)
    image[height // 6: height // 6 + height // 4, width - width // 3: width - width // 8] = (
        20, 40, 160)
    return image


def png_bytes(image: np.ndarray, **save_args) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", **save_args)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A 60-byte PNG whose IHDR claims ``width`` x ``height`` RGB pixels (a pixel bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
            + chunk(b"IEND", b""))


def shape_mask(rng: np.random.Generator, height: int, width: int, label: int) -> np.ndarray:
    """uint8 [H, W]: a rectangle (label 1) or an ellipse (label 2) at a random place."""
    bh, bw = rng.integers(height // 5, height // 2), rng.integers(width // 5, width // 2)
    y, x = rng.integers(0, height - bh), rng.integers(0, width - bw)
    mask = np.zeros((height, width), np.uint8)
    if label == 1:
        mask[y:y + bh, x:x + bw] = 1
    else:
        yy, xx = np.ogrid[:height, :width]
        mask[((yy - y - bh / 2) / (bh / 2)) ** 2 + ((xx - x - bw / 2) / (bw / 2)) ** 2 <= 1] = 1
    return mask


def shapes_scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, dict]:
    """uint8 RGB [H, W, 3] with 1-3 coloured shapes on black, and its training target."""
    image = np.zeros((height, width, 3), np.uint8)
    labels = rng.integers(1, 3, int(rng.integers(1, 4)))
    masks = np.stack([shape_mask(rng, height, width, int(label)) for label in labels])
    for mask in masks:
        image[mask.astype(bool)] = rng.integers(80, 256, 3)
    boxes = [[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
             for ys, xs in (np.nonzero(m) for m in masks)]
    target = {"boxes": torch.tensor(boxes, dtype=torch.float32),
              "labels": torch.as_tensor(labels, dtype=torch.int64),
              "masks": torch.from_numpy(masks)}
    return image, target


def train_heads(network, iterations: int, rng: np.random.Generator) -> None:
    """Train only the ROI heads of ``network`` on `shapes_scene` batches of two at 128x160
    (backbone and RPN stay at their init, which keeps it fast); leaves it in eval mode."""
    heads = [p for n, p in network.named_parameters() if n.startswith("roi_heads")]
    for name, param in network.named_parameters():
        param.requires_grad_(name.startswith("roi_heads"))
    optimizer = torch.optim.SGD(heads, lr=0.02, momentum=0.9, weight_decay=1e-4)
    network.train()
    for it in range(iterations):
        batch = [shapes_scene(rng, 128, 160) for _ in range(2)]
        for group in optimizer.param_groups:
            group["lr"] = 0.02 * min(1.0, (it + 1) / 5)
        losses = network([to_tensor(b[0]) for b in batch],
                         [b[1] for b in batch])
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    network.eval()
