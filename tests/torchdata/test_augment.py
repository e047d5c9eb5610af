"""Augmentation presets keep image, masks, boxes and labels aligned; seeding is per transform."""
from __future__ import annotations

import warnings

import albumentations as A
import cv2
import numpy as np
import pytest
from PIL import Image

from instseg_pipeline.config_schema import ConfigError, build
from instseg_pipeline.data.masks import bitmap_to_rle, rle_to_string
from instseg_pipeline.data.tables import make_categories, make_images, make_instances
from instseg_pipeline.engine.config import AugmentationConfig
from instseg_pipeline.torchdata.augment import (
    AugmentationConfigError,
    build_augmentation,
    seed_augmentation,
)
from instseg_pipeline.torchdata.dataset import InstanceDataset

H, W = 96, 128
# two rectangles: a red one (category 1) and a green one (category 2), on a dark background
RED = (slice(20, 60), slice(15, 55))
GREEN = (slice(50, 85), slice(70, 120))


def typed(params: dict) -> AugmentationConfig:
    """The ``training.augmentation`` block as the training node builds it."""
    return build(AugmentationConfig, params, "training.augmentation")


def _build(params):
    """build_augmentation, failing on any warning (2.x ignores 1.x arguments with one)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return build_augmentation(typed(params))


@pytest.fixture
def dataset_factory(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 40, (H, W, 3), dtype=np.uint8)
    pixels[RED] = (255, 0, 0)
    pixels[GREEN] = (0, 255, 0)
    Image.fromarray(pixels).save(tmp_path / "shapes.png")
    rows = []
    for instance_id, (region, category) in enumerate([(RED, 1), (GREEN, 2)]):
        mask = np.zeros((H, W), np.uint8)
        mask[region] = 1
        rows.append({"instance_id": instance_id, "image_id": 1, "category_id": category,
                     "bbox": [0, 0, 1, 1], "area": int(mask.sum()), "iscrowd": False,
                     "rle": rle_to_string(bitmap_to_rle(mask))})
    images = make_images([{"image_id": 1, "file_name": "shapes.png", "width": W, "height": H,
                           "split": "train", "source": "test"}])
    categories = make_categories([{"category_id": c, "name": n, "supercategory": "s",
                                   "isthing": True} for c, n in [(1, "red"), (2, "green")]])

    def make(params, seed=0):
        return InstanceDataset(images, make_instances(rows), categories, tmp_path,
                               augmentation=_build(params), seed=seed)
    return make


def _tight_box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def _check_aligned(image, target) -> None:
    """Mask interiors have the instance's colour; nothing of that colour lies far outside."""
    pixels = image.permute(1, 2, 0).numpy()
    kernel = np.ones((5, 5), np.uint8)  # 2 px of interpolation slack at the edges
    for mask, box, label in zip(target["masks"].numpy(), target["boxes"].tolist(),
                                target["labels"].tolist()):
        assert box == _tight_box(mask)
        channel = label - 1  # label 1 is red (channel 0), label 2 green (channel 1)
        inner = cv2.erode(mask, kernel).astype(bool)
        outer = cv2.dilate(mask, kernel).astype(bool)
        colour = (pixels[..., channel] > 0.6) & (pixels[..., 1 - channel] < 0.4)
        if inner.any():
            assert colour[inner].mean() > 0.97
        assert colour[~outer].mean() < 0.01


@pytest.mark.parametrize("preset", ["none", "light", "strong"])
def test_presets_keep_masks_boxes_and_image_aligned(dataset_factory, preset):
    dataset = dataset_factory({"preset": preset, "size": [H, W]})
    first, _ = dataset[0]
    changed = 0
    for epoch in range(12):
        dataset.set_epoch(epoch)
        image, target = dataset[0]
        assert target["masks"].shape[1:] == image.shape[1:]
        assert target["boxes"].shape[0] == target["labels"].shape[0] == len(target["masks"])
        assert (target["area"].numpy() == target["masks"].numpy().sum(axis=(1, 2))).all()
        _check_aligned(image, target)
        changed += not np.array_equal(image.numpy(), first.numpy())
    assert (changed == 0) == (preset == "none")


def test_boxes_dropped_by_albumentations_take_their_masks(dataset_factory):
    # the crop keeps 10 of the green rectangle's 35 rows: visible but under min_visibility
    dataset = dataset_factory({"min_visibility": 0.5, "transforms": [
        {"name": "Crop", "x_min": 0, "y_min": 0, "x_max": W, "y_max": 60}]})
    image, target = dataset[0]
    assert target["labels"].tolist() == [1]
    _check_aligned(image, target)
    everything = dataset_factory({"transforms": [
        {"name": "Crop", "x_min": 0, "y_min": 0, "x_max": W, "y_max": 60}]})
    assert everything[0][1]["labels"].tolist() == [1, 2]


def test_none_preset_is_no_augmentation():
    assert build_augmentation(typed({"preset": "none"})) is None
    assert build_augmentation(None) is None


def test_presets_build_without_warnings():
    for params in ({"preset": "light"}, {"preset": "strong", "size": [64, 64]}):
        compose = _build(params)
        assert isinstance(compose, A.Compose)
        assert compose.processors["bboxes"].params.label_fields == ["labels", "instance_index"]
        names = {type(t).__name__ for t in compose.transforms}
        assert "Normalize" not in names and "HorizontalFlip" in names


def test_strong_needs_a_size():
    with pytest.raises(AugmentationConfigError, match="size"):
        build_augmentation(typed({"preset": "strong"}))


def test_unknown_preset_and_transform():
    with pytest.raises(ConfigError, match=r"training\.augmentation\.preset: expected one of"):
        typed({"preset": "medium"})
    with pytest.raises(AugmentationConfigError, match="preset"):  # built by hand, unchecked
        build_augmentation(AugmentationConfig(preset="medium"))
    with pytest.raises(AugmentationConfigError, match="Nonexistent"):
        build_augmentation(typed({"transforms": [{"name": "Nonexistent"}]}))


def test_old_argument_names_are_errors():
    with pytest.raises(AugmentationConfigError, match="var_limit"):
        build_augmentation(typed({"transforms": [{"name": "GaussNoise",
                                                  "var_limit": [10, 50]}]}))


def test_transform_list_replaces_the_preset():
    compose = _build({"preset": "strong", "transforms": [
        {"name": "HorizontalFlip", "p": 1.0},
        {"name": "OneOf", "p": 0.5, "transforms": [{"name": "GaussNoise"}, {"name": "ISONoise"}]}]})
    assert [type(t).__name__ for t in compose.transforms] == ["HorizontalFlip", "OneOf"]
    assert [type(t).__name__ for t in compose.transforms[1].transforms] == ["GaussNoise",
                                                                            "ISONoise"]


def test_transforms_with_equal_probability_fire_independently():
    # albumentations 2.x hands every transform the Compose's seed; equal p then means
    # "always together", which seed_augmentation must undo
    image = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    compose = A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)])
    seen = set()
    for seed in range(40):
        seed_augmentation(compose, seed)
        out = compose(image=image)["image"]
        seen.add((np.array_equal(out, image[:, ::-1]), np.array_equal(out, image[::-1]),
                  np.array_equal(out, image[::-1, ::-1])))
    assert len(seen) == 4


def test_seed_augmentation_repeats_exactly():
    compose = _build({"preset": "strong", "size": [48, 64]})
    image = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    masks = np.zeros((1, 60, 80), np.uint8)
    masks[0, 10:30, 20:50] = 1
    call = {"image": image, "masks": masks, "labels": [1], "instance_index": [0],
            "bboxes": np.array([[20, 10, 50, 30]], np.float32)}
    outputs = []
    for seed in (3, 4, 3):
        seed_augmentation(compose, seed)
        outputs.append(compose(**call)["image"])
    assert np.array_equal(outputs[0], outputs[2]) and not np.array_equal(outputs[0], outputs[1])


def test_augmentation_preview_draws_a_grid(dataset_factory):
    from instseg_pipeline.viz.training import augmentation_preview

    figure = augmentation_preview(dataset_factory({"preset": "light"}), n=3, seed=0)
    drawn = [ax for ax in figure.axes if ax.images]
    assert len(drawn) == 1  # one image in the dataset
    assert len(drawn[0].patches) == 2  # one box per instance
    assert {t.get_text() for t in drawn[0].texts} == {"red", "green"}
