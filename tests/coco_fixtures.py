"""Builders of small COCO datasets on disk for the ingestion tests."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from instseg_pipeline.data import masks


def square_polygon(x: float, y: float, side: float) -> list[list[float]]:
    return [[x, y, x + side, y, x + side, y + side, x, y + side]]


def write_rgb(path: Path, width: int, height: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)


def make_coco(root: Path, n_images: int = 3, width: int = 40, height: int = 30) -> dict:
    """Images ``img{i}.png`` under root/images, two square instances each, one crowd RLE.

    Returns the json dict (also written to root/annotations.json); tests mutate it and
    call `write_json` again.
    """
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(1, n_images + 1):
        write_rgb(root / "images" / f"img{i}.png", width, height, seed=i)
        images.append({"id": i, "file_name": f"img{i}.png", "width": width, "height": height})
        for j, (x, y) in enumerate([(2, 2), (20, 10)]):
            annotations.append({"id": 100 * i + j, "image_id": i, "category_id": 3 + 4 * j,
                                "segmentation": square_polygon(x, y, 8), "bbox": [x, y, 8, 8],
                                "area": 64.0, "iscrowd": 0})
    crowd = np.zeros((height, width), dtype=np.uint8)
    crowd[20:28, 2:12] = 1
    counts = _uncompressed_counts(crowd)
    annotations.append({"id": 999, "image_id": 1, "category_id": 3, "iscrowd": 1,
                        "segmentation": {"size": [height, width], "counts": counts},
                        "bbox": [2, 20, 10, 8], "area": 80.0})
    data = {"images": images, "annotations": annotations,
            "categories": [{"id": 3, "name": "car", "supercategory": "vehicle"},
                           {"id": 7, "name": "train", "supercategory": "vehicle"}]}
    write_json(root, data)
    return data


def _uncompressed_counts(mask: np.ndarray) -> list[int]:
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for value in flat:
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    return counts


def write_json(root: Path, data: dict, name: str = "annotations.json") -> Path:
    path = root / name
    # allow_nan: the bad-input tests need NaN / Infinity tokens exactly as broken files have.
    path.write_text(json.dumps(data, allow_nan=True))
    return path


def coco_params(root: Path, **extra) -> dict:
    return {"type": "coco", "root": str(root), "annotations": "annotations.json",
            "images": "images", **extra}


def decode(counts: str, height: int, width: int) -> np.ndarray:
    return masks.decode_strings([counts], height, width)[0]


# cocoapi results/val2014_fake_eval_res.txt at full precision (see the data's SOURCE.md)
REFERENCE = {
    "bbox": [0.5045806987249628, 0.6969727247299577, 0.5729816669904824, 0.5856257209410443,
             0.5193996948036719, 0.5013978986347466, 0.38681277964578054, 0.5936795762842003,
             0.595352982877607, 0.6398109626113442, 0.5664205978994309, 0.5642905982905982],
    "segm": [0.3195452758576433, 0.5622883972521636, 0.29892653412086784, 0.3873740315997838,
             0.31018272403369485, 0.3269339071005138, 0.2682297225711534, 0.41544868114906375,
             0.4168394992198818, 0.4694498622754236, 0.37675922666197265, 0.3814715099715099],
}
RESULT_FILES = {"bbox": "instances_val2014_fakebbox100_results.json",
                "segm": "instances_val2014_fakesegm100_results.json"}


def fake_paths(root: Path, iou_type: str) -> tuple[Path, Path]:
    """(ground-truth json, fake results json) of cocoapi-fake-results for ``iou_type``."""
    return (root / "ground_truth" / "instances_val2014_100.json",
            root / "results" / RESULT_FILES[iou_type])
