"""Semantic targets of panoptic families: the map of things, stuff, crowd and void, its
augmentation with the image, and instance targets left as they were without it."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scene_shapes import instance_row, rect

from instseg_pipeline.config_schema import build
from instseg_pipeline.data.semantic import (
    decode_semantic,
    group_segments,
    semantic_map,
    semantic_maps,
)
from instseg_pipeline.data.tables import (
    IGNORE_LABEL,
    THINGS_LABEL,
    make_categories,
    make_images,
    make_instances,
    stuff_mapping,
)
from instseg_pipeline.engine.config import AugmentationConfig
from instseg_pipeline.torchdata.augment import build_augmentation
from instseg_pipeline.torchdata.dataset import InstanceDataset

W, H = 40, 32


def _rect(y0, y1, x0, x1) -> np.ndarray:
    return rect(H, W, x0, y0, x1, y1)


# categories: things 7 ("car") and 3 ("person"); stuff 40 ("sky") and 20 ("road"):
# stuff_mapping sorts the stuff ids, so road -> 1 and sky -> 2
CATEGORIES = make_categories([
    {"category_id": 7, "name": "car", "supercategory": "vehicle", "isthing": True},
    {"category_id": 3, "name": "person", "supercategory": "person", "isthing": True},
    {"category_id": 40, "name": "sky", "supercategory": "sky", "isthing": False},
    {"category_id": 20, "name": "road", "supercategory": "ground", "isthing": False}])
SKY, ROAD = 2, 1


@pytest.fixture
def tables(tmp_path):
    """Image 1 (train): sky rows 0..11, road rows 20..31, a car on top of sky and road,
    a crowd of people inside the road, void rows 12..19 outside the car. Image 2 (train):
    nothing. Image 3 (val): one sky segment, no things."""
    rng = np.random.default_rng(1)
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(tmp_path / name)
    images = make_images([
        {"image_id": image_id, "file_name": name, "width": W, "height": H, "split": split,
         "source": "handmade"}
        for image_id, name, split in ((1, "a.png", "train"), (2, "b.png", "train"),
                                      (3, "c.png", "val"))])
    instances = make_instances([
        instance_row(10, 1, 7, _rect(8, 24, 4, 12)),                  # car across sky, void, road
        instance_row(11, 1, 3, _rect(26, 30, 30, 38), iscrowd=True)])  # crowd inside the road
    stuff = make_instances([
        instance_row(50, 1, 40, _rect(0, 12, 0, W)),
        instance_row(51, 1, 20, _rect(20, 32, 0, W)),
        instance_row(52, 3, 40, _rect(0, 5, 0, W))])
    return images, instances, stuff, CATEGORIES, tmp_path


def _expected_image_1() -> np.ndarray:
    expected = np.full((H, W), IGNORE_LABEL, np.int64)
    expected[0:12] = SKY
    expected[20:32] = ROAD
    expected[8:24, 4:12] = THINGS_LABEL
    expected[26:30, 30:38] = THINGS_LABEL
    return expected


def test_semantic_map_of_hand_made_tables(tables):
    images, instances, stuff, categories, root = tables
    assert stuff_mapping(categories) == {20: ROAD, 40: SKY}
    dataset = InstanceDataset(images, instances, categories, root, split="train",
                              stuff_segments=stuff, semantic=True)
    _, target = dataset[0]
    assert target["semantic"].dtype == torch.int64 and target["semantic"].shape == (H, W)
    np.testing.assert_array_equal(target["semantic"].numpy(), _expected_image_1())
    # the crowd region is a thing pixel of the map but still no instance target
    assert target["labels"].tolist() == [2] and target["masks"].shape == (1, H, W)
    assert dataset.stuff_names == {ROAD: "road", SKY: "sky"}
    # an image with neither stuff nor things is void everywhere
    _, empty = dataset[1]
    assert (empty["semantic"] == IGNORE_LABEL).all()


def test_val_split_only_reads_its_own_stuff(tables):
    images, instances, stuff, categories, root = tables
    dataset = InstanceDataset(images, instances, categories, root, split="val",
                              stuff_segments=stuff, semantic=True)
    expected = np.full((H, W), IGNORE_LABEL, np.int64)
    expected[0:5] = SKY
    np.testing.assert_array_equal(dataset[0][1]["semantic"].numpy(), expected)


def test_torch_free_helpers_agree_with_the_dataset(tables):
    images, instances, stuff, categories, _ = tables
    maps = dict(semantic_maps(images, instances, stuff, categories))
    assert sorted(maps) == [1, 2, 3]
    np.testing.assert_array_equal(maps[1], _expected_image_1())
    assert (maps[2] == IGNORE_LABEL).all()
    grouped = group_segments(instances, stuff, categories)
    assert grouped[1].stuff_labels == [SKY, ROAD] and len(grouped[1].things) == 2
    np.testing.assert_array_equal(decode_semantic(grouped[1], H, W), maps[1])
    assert (decode_semantic(None, H, W) == IGNORE_LABEL).all()


def test_things_override_stuff_and_later_stuff_wins():
    things = _rect(0, 4, 0, 4)[None]
    stuff = np.stack([_rect(0, 8, 0, 8), _rect(6, 10, 6, 10)])
    out = semantic_map(H, W, things, stuff, [1, 3])
    assert out[0, 0] == THINGS_LABEL and out[5, 5] == 1 and out[7, 7] == 3
    assert out[9, 9] == 3 and out[20, 20] == IGNORE_LABEL
    with pytest.raises(ValueError, match="2 stuff masks but 1 stuff labels"):
        semantic_map(H, W, None, stuff, [1])
    with pytest.raises(ValueError, match="stuff label 255 out of range"):
        semantic_map(H, W, None, stuff[:1], [255])
    with pytest.raises(ValueError, match=r"thing_masks: expected \[N, 32, 40\]"):
        semantic_map(H, W, things[0], None)


def test_stuff_row_of_a_thing_category_is_named(tables):
    images, instances, stuff, categories, root = tables
    wrong = stuff.copy()
    wrong.loc[wrong["instance_id"] == 51, "category_id"] = 7
    with pytest.raises(ValueError, match=r"stuff segment 51 \(image 1\) has category_id 7: "
                                         r"a thing category"):
        InstanceDataset(images, instances, categories, root, split="train",
                        stuff_segments=wrong, semantic=True)
    wrong.loc[wrong["instance_id"] == 51, "category_id"] = 99
    with pytest.raises(ValueError, match=r"category_id 99: not in the categories table"):
        group_segments(instances, wrong, categories)


def _augmented(tables, transforms: list[dict]):
    images, instances, stuff, categories, root = tables
    augmentation = build_augmentation(build(AugmentationConfig, {"transforms": transforms},
                                            "training.augmentation"))
    dataset = InstanceDataset(images, instances, categories, root, split="train",
                              augmentation=augmentation, stuff_segments=stuff, semantic=True)
    return dataset


def test_flip_moves_map_masks_and_image_together(tables):
    dataset = _augmented(tables, [{"name": "HorizontalFlip", "p": 1.0}])
    image, target = dataset[0]
    np.testing.assert_array_equal(target["semantic"].numpy(), _expected_image_1()[:, ::-1])
    # the car's mask and its thing pixels in the map stay one region
    car = target["masks"][0].bool()
    assert bool((target["semantic"][car] == THINGS_LABEL).all())
    assert target["boxes"].tolist() == [[W - 12, 8, W - 4, 24]]
    original = np.asarray(Image.open(dataset.root / "a.png"), dtype=np.float32) / 255.0
    np.testing.assert_allclose(image.permute(1, 2, 0).numpy(), original[:, ::-1], atol=1e-6)


def test_padding_and_affine_borders_are_void_not_things(tables):
    # pad the 32 x 40 image to 48 x 56 (the masks' fill is 0), then shift it left and up
    dataset = _augmented(tables, [
        {"name": "PadIfNeeded", "min_height": 48, "min_width": 56, "position": "top_left",
         "border_mode": 0, "p": 1.0},
        {"name": "Affine", "translate_px": {"x": 8, "y": 4}, "border_mode": 0, "p": 1.0}])
    _, target = dataset[0]
    semantic = target["semantic"].numpy()
    assert semantic.shape == (48, 56)
    expected = np.full((48, 56), IGNORE_LABEL, np.int64)
    expected[4:4 + H, 8:8 + W] = _expected_image_1()
    np.testing.assert_array_equal(semantic, expected)
    assert set(np.unique(semantic).tolist()) == {THINGS_LABEL, ROAD, SKY, IGNORE_LABEL}
    _, empty = dataset[1]
    assert (empty["semantic"] == IGNORE_LABEL).all()


def test_strong_preset_keeps_the_map_in_range_and_the_size_of_the_image(tables):
    images, instances, stuff, categories, root = tables
    augmentation = build_augmentation(build(AugmentationConfig,
                                            {"preset": "strong", "size": [24, 28]},
                                            "training.augmentation"))
    dataset = InstanceDataset(images, instances, categories, root, split="train",
                              augmentation=augmentation, stuff_segments=stuff, semantic=True)
    for epoch in range(4):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            image, target = dataset[index]
            assert target["semantic"].shape == image.shape[1:]
            values = set(torch.unique(target["semantic"]).tolist())
            assert values <= {THINGS_LABEL, ROAD, SKY, IGNORE_LABEL}
            # every kept instance's pixels are thing pixels of the map
            for mask in target["masks"].bool():
                assert bool((target["semantic"][mask] == THINGS_LABEL).all())
        # the same (seed, epoch, index) gives the same map
        again = dataset[0][1]["semantic"]
        assert torch.equal(again, dataset[0][1]["semantic"])


@pytest.mark.parametrize("preset", [{"preset": "none"}, {"preset": "strong", "size": [24, 28]}])
def test_without_semantic_targets_are_unchanged(tables, preset):
    images, instances, stuff, categories, root = tables
    augmentation = build_augmentation(build(AugmentationConfig, preset,
                                            "training.augmentation"))
    plain = InstanceDataset(images, instances, categories, root, split="train",
                            augmentation=augmentation)
    with_stuff = InstanceDataset(images, instances, categories, root, split="train",
                                 augmentation=augmentation, stuff_segments=stuff)
    semantic = InstanceDataset(images, instances, categories, root, split="train",
                               augmentation=augmentation, stuff_segments=stuff, semantic=True)
    for epoch in range(2):
        for dataset in (plain, with_stuff, semantic):
            dataset.set_epoch(epoch)
        for index in range(len(plain)):
            image_a, target_a = plain[index]
            image_b, target_b = with_stuff[index]
            image_c, target_c = semantic[index]
            assert "semantic" not in target_a and "semantic" not in target_b
            assert set(target_a) == {"boxes", "labels", "masks", "image_id", "area", "iscrowd"}
            for image, target in ((image_b, target_b), (image_c, target_c)):
                # the semantic map rides along without moving any other draw
                assert torch.equal(image_a, image)
                for key, value in target_a.items():
                    assert (torch.equal(value, target[key]) if isinstance(value, torch.Tensor)
                            else value == target[key]), key


def test_without_semantic_stuff_segments_are_not_read(tables):
    images, instances, _, categories, root = tables
    broken = pd.DataFrame({"nonsense": [1]})
    dataset = InstanceDataset(images, instances, categories, root, split="train",
                              stuff_segments=broken)
    assert "semantic" not in dataset[0][1]
