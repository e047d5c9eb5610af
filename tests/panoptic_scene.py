"""A tiny panoptic dataset on disk and oracle model families for the panoptic tests
(tests/pipelines/test_evaluation_panoptic.py, tests/viz/test_panoptic.py).

Scene (96 x 128 PNGs): things circle=1 and square=2, stuff sky=5 (the top rows) and
ground=6 (the bottom rows), stuff never under a thing. Images 1-3 are val, 4 is train.
Image 3 has a small ground strip (`SMALL_GROUND` pixels) and image 2 a crowd circle.

`oracle_registrar` registers (in a copy of the registry) a family whose network answers each
known image with its ground truth: the things as eval outputs and, for the semantic
variant, the semantic map of `data.tables.stuff_mapping`. The instance variant errs on
purpose (a shifted square, a background false positive, an overlapping duplicate), so its
PQ is neither 0 nor 1.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scene_shapes import circle, instance_row, rect
from torch import nn

from instseg_pipeline.data import masks
from instseg_pipeline.data.tables import (
    label_mapping,
    make_categories,
    make_images,
    make_instances,
    stuff_mapping,
)
from instseg_pipeline.models import OnnxSpec, registry
from instseg_pipeline.models.contract import ModelFamily

HEIGHT, WIDTH = 96, 128
SEMANTIC_ORACLE, INSTANCE_ORACLE = "oracle_panoptic", "oracle_instances"
SMALL_GROUND = 3 * WIDTH  # image 3's ground: three rows
CATEGORIES = [(1, "circle", True), (2, "square", True), (5, "sky", False),
              (6, "ground", False)]
COLOURS = {1: (210, 40, 40), 2: (40, 80, 210), 5: (150, 200, 240), 6: (110, 90, 40)}


def _circle(cx, cy, r):
    return circle(HEIGHT, WIDTH, cx, cy, r)


def _rect(x0, y0, x1, y1):
    return rect(HEIGHT, WIDTH, x0, y0, x1, y1)


# things: instance_id -> (image_id, category_id, mask, iscrowd)
THINGS = {
    11: (1, 1, _circle(35, 45, 16), False),
    12: (1, 2, _rect(70, 30, 100, 60), False),
    21: (2, 2, _rect(20, 40, 50, 70), False),
    22: (2, 1, _circle(95, 50, 14), True),
    31: (3, 1, _circle(60, 40, 20), False),
    32: (3, 2, _rect(95, 20, 120, 45), False),
    41: (4, 2, _rect(30, 30, 60, 60), False),
}
# ground starts at this row, per image (image 3: a thin strip)
GROUND_ROW = {1: 70, 2: 75, 3: HEIGHT - 3, 4: 70}


def _stuff_masks(image_id: int) -> dict[int, np.ndarray]:
    """{stuff category: mask} of one image: sky above 30 % of the rows, ground below
    `GROUND_ROW`, neither under a thing."""
    things = np.zeros((HEIGHT, WIDTH), bool)
    for image, _, mask, _ in THINGS.values():
        if image == image_id:
            things |= mask.astype(bool)
    sky, ground = np.zeros_like(things), np.zeros_like(things)
    sky[: int(0.3 * HEIGHT)] = True
    ground[GROUND_ROW[image_id]:] = True
    return {5: (sky & ~things).astype(np.uint8), 6: (ground & ~things).astype(np.uint8)}


def _picture(image_id: int) -> np.ndarray:
    rng = np.random.default_rng(image_id)
    pixels = np.full((HEIGHT, WIDTH, 3), 128.0) + rng.normal(0, 10, (HEIGHT, WIDTH, 3))
    for category, mask in _stuff_masks(image_id).items():
        pixels[mask.astype(bool)] = COLOURS[category]
    for image, category, mask, _ in THINGS.values():
        if image == image_id:
            pixels[mask.astype(bool)] = COLOURS[category]
    return pixels.clip(0, 255).astype(np.uint8)


def build_scene(root: Path) -> dict:
    """Write the images under ``root`` and return the tables (images, instances,
    stuff_segments, categories) plus ``root``."""
    (root / "images").mkdir(parents=True)
    for image_id in range(1, 5):
        Image.fromarray(_picture(image_id)).save(root / "images" / f"img{image_id}.png")
    images = make_images({"image_id": i, "file_name": f"images/img{i}.png", "width": WIDTH,
                          "height": HEIGHT, "split": "train" if i == 4 else "val",
                          "source": "test"} for i in range(1, 5))
    instances = make_instances(instance_row(k, *v) for k, v in THINGS.items())
    stuff = make_instances(instance_row(100 * image_id + category, image_id, category, mask)
                           for image_id in range(1, 5)
                           for category, mask in _stuff_masks(image_id).items())
    categories = make_categories({"category_id": c, "name": n, "supercategory": "scene",
                                  "isthing": t} for c, n, t in CATEGORIES)
    return {"root": root, "images": images, "instances": instances, "stuff_segments": stuff,
            "categories": categories}


# ------------------------------------------------------------------ oracle families

def fingerprint(image) -> str:
    """Key of a float [3, H, W] image in [0, 1] (as `predict` feeds it) or uint8 [H, W, 3]."""
    if isinstance(image, torch.Tensor):
        image = (image.detach().cpu().permute(1, 2, 0).numpy() * 255).round()
    return hashlib.sha1(np.ascontiguousarray(image, dtype=np.uint8).tobytes()).hexdigest()


def _semantic_map(image_id: int, categories) -> np.ndarray:
    semantic = np.zeros((HEIGHT, WIDTH), np.int64)
    for category, mask in _stuff_masks(image_id).items():
        semantic[mask.astype(bool)] = stuff_mapping(categories)[category]
    return semantic


def _things_of(image_id: int, errs: bool) -> list[tuple[int, float, np.ndarray]]:
    """(category, score, mask) the oracle finds: the non-crowd GT, or with errors."""
    mine = [(c, m) for i, c, m, crowd in THINGS.values() if i == image_id and not crowd]
    found = [(c, 0.95 - 0.05 * k, m) for k, (c, m) in enumerate(mine)]
    if errs and image_id == 1:
        category, score, mask = found[1]
        found[1] = (category, score, np.roll(mask, 12, axis=1))          # shifted: IoU < .5
        found.append((1, 0.8, _rect(2, 75, 20, 92)))                      # background FP
        found.append((1, 0.6, np.roll(found[0][2], 2, axis=0)))           # duplicate: dropped
    return found


def oracle_answers(scene: dict, semantic: bool) -> dict[str, dict]:
    """{image fingerprint: eval output} of every scene image."""
    labels = label_mapping(scene["categories"])
    answers = {}
    for image_id in range(1, 5):
        found = _things_of(image_id, errs=not semantic)
        output = {
            "boxes": torch.tensor([_xyxy(m) for _, _, m in found], dtype=torch.float32
                                  ).reshape(-1, 4),
            "labels": torch.tensor([labels[c] for c, _, _ in found], dtype=torch.int64),
            "scores": torch.tensor([s for _, s, _ in found], dtype=torch.float32),
            "masks": torch.from_numpy(np.stack([m for _, _, m in found]).astype(np.float32)
                                      ).reshape(-1, 1, HEIGHT, WIDTH)}
        if semantic:
            output["semantic"] = torch.from_numpy(_semantic_map(image_id,
                                                                scene["categories"]))
        answers[fingerprint(_picture(image_id))] = output
    return answers


def _xyxy(mask: np.ndarray) -> list[float]:
    x, y, w, h = masks.rle_bbox(masks.bitmap_to_rle(mask))
    return [x, y, x + w, y + h]


class OracleNet(nn.Module):
    """Answers every known image with its stored eval output; an unknown image is an error."""

    def __init__(self, answers: dict[str, dict]):
        super().__init__()
        self.answers = answers

    def forward(self, images, targets=None):
        outputs = []
        for image in images:
            key = fingerprint(image)
            if key not in self.answers:
                raise KeyError("the oracle does not know this image")
            outputs.append({k: v.to(image.device) for k, v in self.answers[key].items()})
        return outputs


def _family(name: str, answers: dict, semantic: bool) -> ModelFamily:
    base = registry.family("maskrcnn_tiny")
    return dataclasses.replace(
        base, name=name, build=lambda params, num_classes: OracleNet(answers), keys=(),
        onnx=OnnxSpec(exportable=False, note="test oracle: answers from a lookup table"),
        section="", semantic=semantic)


def oracle_model(scene: dict, semantic: bool) -> dict:
    """The model dict (as training saves it) of the registered oracle."""
    categories = scene["categories"]
    things, stuff = label_mapping(categories), stuff_mapping(categories)
    names = dict(zip(categories["category_id"], categories["name"]))
    model = {"config": {"name": SEMANTIC_ORACLE if semantic else INSTANCE_ORACLE,
                        "num_classes": len(things) + 1},
             "state_dict": {}, "classes": {k: names[c] for c, k in things.items()},
             "category_ids": {k: c for c, k in things.items()}, "iterations": 0}
    if semantic:
        model["stuff_category_ids"] = {k: c for c, k in stuff.items()}
        model["stuff_classes"] = {k: names[c] for c, k in stuff.items()}
    return model


def oracle_registrar(monkeypatch):
    """register(scene) -> (semantic model dict, instance model dict), both oracles
    registered in a copy of the registry that ``monkeypatch`` puts back after the test."""
    monkeypatch.setattr(registry, "FAMILIES", dict(registry.FAMILIES))

    def register(scene: dict) -> tuple[dict, dict]:
        registry.register(_family(SEMANTIC_ORACLE, oracle_answers(scene, True), True))
        registry.register(_family(INSTANCE_ORACLE, oracle_answers(scene, False), False))
        return oracle_model(scene, True), oracle_model(scene, False)

    return register
