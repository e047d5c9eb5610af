"""A tiny on-disk dataset with known true / false positives, shared by the error-analysis
tests (tests/evaluation/test_errors.py) and the figure tests (tests/viz/).

Scene (160 x 120 PNGs, categories circle=1, square=2, triangle=5):
- image 1 (val): circle A and square B, both found; a confident background FP (p3) and a
  low-score FP (p4, below the threshold);
- image 2 (val): square C found, triangle D missed, a crowd region with a prediction on it
  (p8: ignored, as COCO ignores it);
- image 3 (val): circle E found but called a square (p6: a classification confusion);
- image 4 (train): square F with no prediction (not evaluated, so no false negative).
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from PIL import Image
from scene_shapes import circle, instance_row, rect

from instseg_pipeline.data import masks
from instseg_pipeline.data.tables import make_categories, make_images, make_instances
from instseg_pipeline.evaluation import metrics as evaluation

HEIGHT, WIDTH = 120, 160
THRESHOLD = 0.5
PREDICTION_COLUMNS = ["prediction_id", "image_id", "category_id", "label", "score", "bbox",
                      "area", "rle", "height", "width"]


def _circle(cx, cy, r):
    return circle(HEIGHT, WIDTH, cx, cy, r)


def _rect(x0, y0, x1, y1):
    return rect(HEIGHT, WIDTH, x0, y0, x1, y1)


def _triangle(points):
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    cv2.fillPoly(mask, [np.asarray(points, np.int32)], 1)
    return mask


def _shift(mask, dx, dy):
    return np.roll(np.roll(mask, dy, axis=0), dx, axis=1)


# GT: instance_id -> (image_id, category_id, mask, iscrowd)
GT = {
    11: (1, 1, _circle(45, 50, 24), False),        # A
    12: (1, 2, _rect(100, 55, 140, 95), False),    # B
    21: (2, 2, _rect(20, 20, 50, 50), False),      # C
    22: (2, 5, _triangle([(90, 90), (140, 90), (115, 45)]), False),  # D (missed)
    23: (2, 1, _rect(20, 80, 60, 115), True),      # crowd
    31: (3, 1, _circle(80, 60, 14), False),        # E
    41: (4, 2, _rect(30, 30, 70, 70), False),      # F (train)
}
# predictions: prediction_id -> (image_id, category_id, score, mask)
PRED = {
    1: (1, 1, 0.95, _shift(GT[11][2], 2, 1)),
    2: (1, 2, 0.90, _shift(GT[12][2], -1, 2)),
    3: (1, 2, 0.80, _rect(5, 95, 30, 118)),        # background FP
    4: (1, 5, 0.30, _rect(120, 5, 150, 30)),       # below the threshold
    5: (2, 2, 0.85, _shift(GT[21][2], 1, 1)),
    6: (3, 2, 0.70, _shift(GT[31][2], 1, 0)),      # right place, wrong class
    8: (2, 1, 0.75, _rect(25, 85, 55, 110)),       # inside the crowd region
}
NAMES = {1: "circle", 2: "square", 5: "triangle"}
COLOURS = {1: (200, 40, 40), 2: (40, 80, 200), 5: (230, 200, 30)}


def _write_image(path: Path, image_id: int) -> None:
    rng = np.random.default_rng(image_id)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    base = np.stack([xx / WIDTH * 120 + 60, yy / HEIGHT * 100 + 80, 150 + 0 * xx], axis=2)
    pixels = base + rng.normal(0, 12, base.shape)
    for gt_image, category, mask, _ in GT.values():
        if gt_image == image_id:
            pixels[mask.astype(bool)] = COLOURS[category]
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path)


def _prediction_row(prediction_id, image_id, category_id, score, mask):
    rle = masks.bitmap_to_rle(mask)
    return {"prediction_id": prediction_id, "image_id": image_id, "category_id": category_id,
            "label": category_id, "score": score, "bbox": masks.rle_bbox(rle),
            "area": masks.rle_area(rle), "rle": masks.rle_to_string(rle),
            "height": HEIGHT, "width": WIDTH}


def build_scene(root: Path) -> dict:
    """Write the scene's images under ``root`` and evaluate its predictions: the tables,
    COCO metrics and PR arrays, and the matched pairs at `THRESHOLD`."""
    (root / "images").mkdir()
    for image_id in range(1, 5):
        _write_image(root / "images" / f"img{image_id}.png", image_id)
    images = make_images({"image_id": i, "file_name": f"images/img{i}.png", "width": WIDTH,
                          "height": HEIGHT, "split": "train" if i == 4 else "val",
                          "source": "test"} for i in range(1, 5))
    instances = make_instances(instance_row(k, *v) for k, v in GT.items())
    categories = make_categories({"category_id": c, "name": n, "supercategory": "shape",
                                  "isthing": True} for c, n in NAMES.items())
    predictions = pd.DataFrame([_prediction_row(k, *v) for k, v in PRED.items()],
                               columns=PREDICTION_COLUMNS)
    return _evaluated(root, images, instances, categories, predictions)


def without_predictions(scene: dict) -> dict:
    """The same dataset with no predictions at all."""
    predictions = scene["predictions"].iloc[0:0]
    return _evaluated(scene["root"], scene["images"], scene["instances"], scene["categories"],
                      predictions)


def _evaluated(root, images, instances, categories, predictions) -> dict:
    result = evaluation.coco_metrics(images, instances, categories, predictions, "val",
                                     backend="pycocotools")
    matches = evaluation.matched_mask_ious(images, instances, predictions, "val",
                                           score_threshold=THRESHOLD)
    return {"root": root, "images": images, "instances": instances, "categories": categories,
            "predictions": predictions, "metrics": result["metrics"],
            "arrays": result["arrays"], "matches": matches}


# ------------------------------------------------------------------ reading figures

def titles(figure: Figure) -> list[str]:
    return [ax.get_title() for ax in figure.axes]


def saved_size(figure: Figure, path: Path) -> int:
    """Bytes of the figure saved as PNG: a blank figure is far smaller than a drawn one."""
    figure.savefig(path, dpi=40)
    return path.stat().st_size


def axis_with_title(figure: Figure, text: str):
    """The one axes whose title contains ``text``."""
    found = [ax for ax in figure.axes if text in ax.get_title()]
    assert len(found) == 1, (text, titles(figure))
    return found[0]
