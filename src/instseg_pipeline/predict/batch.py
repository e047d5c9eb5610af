"""Batched inference over an images table -> the predictions table.

Predictions have the canonical instance form plus ``score``: prediction_id, image_id,
category_id, label, score, bbox (COCO x, y, w, h), area, rle (compressed counts string of
the full-size mask thresholded at ``mask_threshold``), height, width.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from instseg_pipeline.data import masks
from instseg_pipeline.data.images import load_image

logger = logging.getLogger(__name__)

PREDICTION_COLUMNS = ["prediction_id", "image_id", "category_id", "label", "score", "bbox",
                      "area", "rle", "height", "width"]


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _rows(output: dict, image_id: int, label_to_category: dict[int, int],
          mask_threshold: float) -> list[dict]:
    """Prediction rows of one image; output masks: float [N, 1, H, W] probabilities."""
    binary = (output["masks"][:, 0] >= mask_threshold).to(torch.uint8).cpu().numpy()
    height, width = binary.shape[-2:]
    rows = []
    for mask, label, score in zip(binary, output["labels"].tolist(), output["scores"].tolist()):
        rle = masks.bitmap_to_rle(mask)
        area = masks.rle_area(rle)
        if area == 0:
            continue  # a box whose mask fell below the threshold everywhere: nothing to score
        rows.append({"image_id": image_id, "category_id": label_to_category[int(label)],
                     "label": int(label), "score": float(score), "bbox": masks.rle_bbox(rle),
                     "area": area, "rle": masks.rle_to_string(rle), "height": int(height),
                     "width": int(width)})
    return rows


def _batches(images: pd.DataFrame, batch_size: int):
    for start in range(0, len(images), batch_size):
        yield images.iloc[start:start + batch_size]


def _load_batch(batch: pd.DataFrame, root: Path) -> list[torch.Tensor]:
    tensors = []
    for row in batch.itertuples(index=False):
        pixels, _ = load_image(root / row.file_name, expected_size=(row.width, row.height))
        # a writable copy: Pillow hands out read-only arrays, which torch warns about
        tensors.append(torch.as_tensor(np.array(pixels)).permute(2, 0, 1).float().div_(255))
    return tensors


@torch.inference_mode()
def predict_images(network: torch.nn.Module, images: pd.DataFrame, root: str | Path,
                   label_to_category: dict[int, int], batch_size: int = 4,
                   device: str = "auto", score_threshold: float = 0.05,
                   mask_threshold: float = 0.5) -> pd.DataFrame:
    """Run ``network`` (torchvision Mask R-CNN) over ``images``; see the module docstring."""
    dev = resolve_device(device)
    network = network.to(dev).eval()
    rows: list[dict] = []
    progress = tqdm(total=len(images), desc="predict", unit="img", disable=None)
    for batch in _batches(images, batch_size):
        tensors = [t.to(dev) for t in _load_batch(batch, Path(root))]
        with torch.autocast(dev.type, enabled=dev.type == "cuda"):
            outputs = network(tensors)
        for image_id, output in zip(batch["image_id"].tolist(), outputs):
            keep = output["scores"] >= score_threshold
            rows.extend(_rows({k: v[keep] for k, v in output.items()}, int(image_id),
                              label_to_category, mask_threshold))
        progress.update(len(batch))
    progress.close()
    frame = pd.DataFrame(rows, columns=PREDICTION_COLUMNS[1:])
    frame.insert(0, "prediction_id", np.arange(1, len(frame) + 1, dtype=np.int64))
    logger.info("%d predictions on %d images", len(frame), len(images))
    return frame.astype({"image_id": "int64", "category_id": "int64", "label": "int64",
                         "score": "float64", "area": "int64", "height": "int64",
                         "width": "int64"})
