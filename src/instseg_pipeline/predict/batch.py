"""Batched prediction over an images table -> the predictions table.

Predictions have the canonical instance form plus ``score``: prediction_id, image_id,
category_id, label, score, bbox (COCO x, y, w, h of the mask), area, rle (compressed counts
string of the full-size mask), height, width; one row per instance of `postprocess`, images
in table order, instances best first.

Batches hold images of one size only: the network pads a batch to its largest image, and
padding changes what the network sees near the borders, so a mixed batch would give an
image other instances than the predictor gives it alone.

`semantic_maps` runs a semantic family over the same batches for its stuff maps (panoptic
inference); the predictions table never holds them.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from instseg_pipeline.data.images import load_image
from instseg_pipeline.predict.backends import forward
from instseg_pipeline.predict.device import resolve_device
from instseg_pipeline.predict.postprocess import postprocess, table_rows
from instseg_pipeline.predict.preprocess import to_tensor
from instseg_pipeline.progress import progress as log_progress

logger = logging.getLogger(__name__)

PREDICTION_COLUMNS = ["prediction_id", "image_id", "category_id", "label", "score", "bbox",
                      "area", "rle", "height", "width"]


def same_size_batches(images: pd.DataFrame, batch_size: int) -> list[list[int]]:
    """Row positions of ``images`` in batches of at most ``batch_size`` images of one
    (height, width); sizes in order of first appearance, rows in table order within one."""
    groups: dict[tuple[int, int], list[int]] = {}
    for position, size in enumerate(zip(images["height"].tolist(), images["width"].tolist())):
        groups.setdefault(size, []).append(position)
    return [rows[start:start + batch_size] for rows in groups.values()
            for start in range(0, len(rows), batch_size)]


def _load(row, root: Path):
    """float32 [3, H, W] tensor of one images-table row."""
    pixels, _ = load_image(root / row.file_name, expected_size=(row.width, row.height))
    return to_tensor(pixels)


def predict_images(network, images: pd.DataFrame, root: str | Path,
                   label_to_category: dict[int, int], batch_size: int = 4,
                   device: str = "auto", score_threshold: float = 0.05,
                   mask_threshold: float = 0.5) -> pd.DataFrame:
    """Run ``network`` (the model contract's eval mode) over ``images``; see the module
    docstring. ``label_to_category`` maps model labels to dataset category ids."""
    dev = resolve_device(device)
    network = network.to(dev).eval()
    per_image: list[list[dict]] = [[] for _ in range(len(images))]
    progress = log_progress(total=len(images), desc="predict", unit="img", logger=logger)
    for positions in same_size_batches(images, max(1, int(batch_size))):
        batch = images.iloc[positions]
        outputs = forward(network, [_load(row, Path(root)) for row in batch.itertuples()], dev)
        for position, image_id, output in zip(positions, batch["image_id"].tolist(), outputs):
            found = postprocess(output, score_threshold, mask_threshold)
            per_image[position] = table_rows(found, image_id, label_to_category)
        progress.update(len(positions))
    progress.close()
    frame = pd.DataFrame([row for rows in per_image for row in rows],
                         columns=PREDICTION_COLUMNS[1:])
    frame.insert(0, "prediction_id", np.arange(1, len(frame) + 1, dtype=np.int64))
    logger.info("%d predictions on %d images", len(frame), len(images))
    return frame.astype({"image_id": "int64", "category_id": "int64", "label": "int64",
                         "score": "float64", "area": "int64", "height": "int64",
                         "width": "int64"})


def semantic_maps(network, images: pd.DataFrame, root: str | Path, batch_size: int = 4,
                  device: str = "auto") -> Iterator[tuple[int, np.ndarray]]:
    """(image_id, int64 [H, W] semantic labels 0..S) of every row of ``images``, from the
    ``"semantic"`` eval output of a semantic family; batches as `predict_images` (so in
    batch order, not table order). Raises ValueError naming the image when the output has
    no semantic map or one of another size."""
    dev = resolve_device(device)
    network = network.to(dev).eval()
    progress = log_progress(total=len(images), desc="semantic", unit="img", logger=logger)
    for positions in same_size_batches(images, max(1, int(batch_size))):
        batch = images.iloc[positions]
        outputs = forward(network, [_load(row, Path(root)) for row in batch.itertuples()], dev)
        for row, output in zip(batch.itertuples(), outputs):
            yield int(row.image_id), _semantic_of(output, row)
        progress.update(len(positions))
    progress.close()


def _semantic_of(output, row) -> np.ndarray:
    if "semantic" not in output:
        raise ValueError(f"image {row.image_id}: the model's eval output has no 'semantic' "
                         "map (not a semantic family?)")
    semantic = output["semantic"]
    semantic = (semantic.detach().cpu().numpy() if hasattr(semantic, "detach")
                else np.asarray(semantic)).astype(np.int64, copy=False)
    if semantic.shape != (int(row.height), int(row.width)):
        raise ValueError(f"image {row.image_id}: semantic map is {list(semantic.shape)}, the "
                         f"image [{row.height}, {row.width}]")
    return semantic
