"""InstanceDataset targets, crowd / negative handling, determinism, samplers and the loader."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from instseg_pipeline.config_schema import build
from instseg_pipeline.data.masks import bitmap_to_rle, rle_to_string
from instseg_pipeline.data.tables import make_categories, make_images, make_instances
from instseg_pipeline.engine.config import AugmentationConfig
from instseg_pipeline.torchdata.augment import build_augmentation
from instseg_pipeline.torchdata.dataset import (
    GroupedBatchSampler,
    InstanceDataset,
    MultiScale,
    aspect_ratio_group_ids,
    build_train_loader,
    collate,
    masks_to_boxes,
)

W, H = 80, 64


def typed(params: dict) -> AugmentationConfig:
    """The ``training.augmentation`` block as the training node builds it."""
    return build(AugmentationConfig, params, "training.augmentation")


def _rect(y0, y1, x0, x1, height=H, width=W) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def _instance(instance_id, image_id, category_id, mask, iscrowd=False) -> dict:
    rle = bitmap_to_rle(mask)
    ys, xs = np.nonzero(mask)
    bbox = [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1),
            float(np.ptp(ys) + 1)] if len(xs) else [0.0, 0.0, 0.0, 0.0]
    return {"instance_id": instance_id, "image_id": image_id, "category_id": category_id,
            "bbox": bbox, "area": int(mask.sum()), "iscrowd": iscrowd,
            "rle": rle_to_string(rle)}


def _write_image(root, name, pixels: np.ndarray) -> None:
    Image.fromarray(pixels).save(root / name)


@pytest.fixture
def tables(tmp_path):
    """Image 1: two instances (category ids 7 and 3) + a crowd region; image 2: no
    instances; image 3 (val): one instance. Pixels are a fixed random pattern."""
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png", "c.png"):
        _write_image(tmp_path, name, rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
    images = make_images([
        {"image_id": 1, "file_name": "a.png", "width": W, "height": H, "split": "train",
         "source": "test"},
        {"image_id": 2, "file_name": "b.png", "width": W, "height": H, "split": "train",
         "source": "test"},
        {"image_id": 3, "file_name": "c.png", "width": W, "height": H, "split": "val",
         "source": "test"}])
    instances = make_instances([
        _instance(10, 1, 7, _rect(5, 20, 10, 40)),
        _instance(11, 1, 3, _rect(30, 60, 50, 75)),
        _instance(12, 1, 3, _rect(0, 10, 60, 80), iscrowd=True),
        _instance(13, 3, 7, _rect(1, 3, 1, 3))])
    categories = make_categories([
        {"category_id": 7, "name": "seven", "supercategory": "x", "isthing": True},
        {"category_id": 3, "name": "three", "supercategory": "x", "isthing": True}])
    return images, instances, categories, tmp_path


def test_target_schema_and_crowd_left_out(tables):
    images, instances, categories, root = tables
    dataset = InstanceDataset(images, instances, categories, root, split="train")
    assert len(dataset) == 2
    image, target = dataset[0]
    assert image.dtype == torch.float32 and image.shape == (3, H, W)
    expected = np.asarray(Image.open(root / "a.png"), dtype=np.float32) / 255.0
    np.testing.assert_allclose(image.permute(1, 2, 0).numpy(), expected, atol=1e-6)
    assert target["image_id"] == 1 and isinstance(target["image_id"], int)
    assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (2, 4)
    assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (2, H, W)
    assert target["labels"].dtype == torch.int64
    # category 3 -> label 1, category 7 -> label 2; the crowd instance is not a target
    assert target["labels"].tolist() == [2, 1]
    assert target["boxes"].tolist() == [[10, 5, 40, 20], [50, 30, 75, 60]]
    assert target["area"].dtype == torch.float32 and target["area"].tolist() == [450, 750]
    assert target["iscrowd"].dtype == torch.int64 and target["iscrowd"].tolist() == [0, 0]
    np.testing.assert_array_equal(target["masks"][0].numpy(), _rect(5, 20, 10, 40))
    assert dataset.label_names == {1: "three", 2: "seven"}


def test_image_without_instances_is_a_negative(tables):
    images, instances, categories, root = tables
    _, target = InstanceDataset(images, instances, categories, root, split="train")[1]
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["masks"].shape == (0, H, W) and target["masks"].dtype == torch.uint8
    assert target["labels"].shape == (0,) and target["area"].shape == (0,)


def test_negative_image_survives_augmentation(tables):
    images, instances, categories, root = tables
    aug = build_augmentation(typed({"preset": "strong", "size": [48, 56]}))
    dataset = InstanceDataset(images, instances, categories, root, split="train",
                              augmentation=aug)
    for epoch in range(3):
        dataset.set_epoch(epoch)
        image, target = dataset[1]
        assert image.shape == (3, 48, 56)
        assert target["boxes"].shape == (0, 4) and target["masks"].shape == (0, 48, 56)


def test_split_none_keeps_every_image(tables):
    images, instances, categories, root = tables
    dataset = InstanceDataset(images, instances, categories, root)
    assert [dataset[i][1]["image_id"] for i in range(len(dataset))] == [1, 2, 3]


def test_unknown_category_names_the_instance(tables):
    images, instances, categories, root = tables
    with pytest.raises(ValueError, match=r"instance 10 \(image 1\) has category_id 7"):
        InstanceDataset(images, instances, categories[categories["category_id"] == 3], root)


def test_wrong_image_size_is_reported(tables):
    images, instances, categories, root = tables
    images = images.assign(width=W + 1)
    with pytest.raises(Exception, match="a.png"):
        InstanceDataset(images, instances, categories, root, split="train")[0]


def test_vanished_and_empty_instances_are_dropped(tables):
    images, instances, categories, root = tables
    empty = _instance(14, 1, 7, np.zeros((H, W), np.uint8))
    instances = make_instances([*instances.to_dict("records"), empty])
    crop = build_augmentation(typed({"transforms": [
        {"name": "Crop", "x_min": 0, "y_min": 0, "x_max": 48, "y_max": 32}]}))
    _, target = InstanceDataset(images, instances, categories, root, split="train",
                                augmentation=crop)[0]
    # instance 11 (x 50..75, y 30..60) lies outside the crop; instance 14 has no pixel
    assert target["labels"].tolist() == [2]
    assert target["masks"].shape == (1, 32, 48)
    assert target["boxes"].tolist() == [[10, 5, 40, 20]]


def test_masks_to_boxes_exclusive_edges():
    masks = np.stack([_rect(2, 5, 3, 9), np.zeros((H, W), np.uint8)])
    assert masks_to_boxes(masks).tolist() == [[3, 2, 9, 5], [0, 0, 0, 0]]


def _assert_same_sample(a, b) -> None:
    assert torch.equal(a[0], b[0])
    for key in ("boxes", "labels", "masks", "area"):
        assert torch.equal(a[1][key], b[1][key]), key


def test_augmentation_is_a_function_of_seed_epoch_index(tables):
    images, instances, categories, root = tables
    aug = {"preset": "strong", "size": [H, W]}

    def make(seed):
        return InstanceDataset(images, instances, categories, root, split="train",
                               augmentation=build_augmentation(typed(aug)), seed=seed)

    first, second, other_seed = make(5), make(5), make(6)
    second[1]  # a different history of calls must not matter
    _assert_same_sample(first[0], second[0])
    epoch0 = [first[0][0] for _ in range(2)]
    assert torch.equal(*epoch0)
    first.set_epoch(1)
    second.set_epoch(1)
    _assert_same_sample(first[0], second[0])
    assert not torch.equal(first[0][0], epoch0[0])
    assert not torch.equal(other_seed[0][0], epoch0[0])


def _many_images(tmp_path, count=12):
    rng = np.random.default_rng(1)
    rows, inst = [], []
    for i in range(count):
        width, height = (40, 24) if i % 3 else (24, 40)
        _write_image(tmp_path, f"{i}.png", rng.integers(0, 256, (height, width, 3), np.uint8))
        rows.append({"image_id": i, "file_name": f"{i}.png", "width": width,
                     "height": height, "split": "train", "source": "test"})
        inst.append(_instance(100 + i, i, 1, _rect(2, 12, 3, 15, height, width)))
    categories = make_categories([{"category_id": 1, "name": "thing", "supercategory": "x",
                                   "isthing": True}])
    return make_images(rows), make_instances(inst), categories


def _loader_batches(dataset, epoch, num_workers=0, group_ids=None, seed=3):
    loader = build_train_loader(dataset, batch_size=4, num_workers=num_workers, seed=seed,
                                epoch=epoch, distributed=False, group_ids=group_ids)
    return [(images, [t["image_id"] for t in targets]) for images, targets in loader]


def test_train_loader_order_depends_only_on_seed_and_epoch(tmp_path):
    images, instances, categories = _many_images(tmp_path)
    aug = build_augmentation(typed({"preset": "light"}))
    dataset = InstanceDataset(images, instances, categories, tmp_path, augmentation=aug)
    epoch2 = _loader_batches(dataset, 2)
    _loader_batches(dataset, 5)
    again = _loader_batches(dataset, 2)
    assert [ids for _, ids in epoch2] == [ids for _, ids in again]
    for (a, _), (b, _) in zip(epoch2, again):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert [ids for _, ids in epoch2] != [ids for _, ids in _loader_batches(dataset, 3)]
    assert sorted(i for _, ids in epoch2 for i in ids) == list(range(12))


def test_distributed_loader_is_reproducible(tmp_path):
    import torch.distributed as dist

    images, instances, categories = _many_images(tmp_path, count=8)
    dataset = InstanceDataset(images, instances, categories, tmp_path)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}",
                            rank=0, world_size=1)
    try:
        orders = [_distributed_ids(dataset, epoch) for epoch in (4, 4, 5)]
    finally:
        dist.destroy_process_group()
    assert orders[0] == orders[1] and orders[0] != orders[2]
    assert sorted(i for ids in orders[0] for i in ids) == list(range(8))


def _distributed_ids(dataset, epoch) -> list[list[int]]:
    loader = build_train_loader(dataset, batch_size=3, num_workers=0, seed=9, epoch=epoch,
                                distributed=True)
    return [[t["image_id"] for t in targets] for _, targets in loader]


def test_workers_give_the_same_samples(tmp_path):
    images, instances, categories = _many_images(tmp_path, count=6)
    aug = build_augmentation(typed({"preset": "light"}))
    dataset = InstanceDataset(images, instances, categories, tmp_path, augmentation=aug)
    alone, workers = _loader_batches(dataset, 1), _loader_batches(dataset, 1, num_workers=2)
    assert [ids for _, ids in alone] == [ids for _, ids in workers]
    for (a, _), (b, _) in zip(alone, workers):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_grouped_loader_batches_share_orientation(tmp_path):
    images, instances, categories = _many_images(tmp_path)
    dataset = InstanceDataset(images, instances, categories, tmp_path)
    groups = aspect_ratio_group_ids(dataset.images)
    batches = _loader_batches(dataset, 0, group_ids=groups)
    assert sorted(i for _, ids in batches for i in ids) == list(range(12))
    for images_batch, ids in batches:
        assert len({tuple(im.shape) for im in images_batch}) == 1, ids


def test_aspect_ratio_group_ids_separates_wide_from_tall():
    frame = make_images([{"image_id": i, "file_name": f"{i}", "width": w, "height": h,
                          "split": "train", "source": "t"}
                         for i, (w, h) in enumerate([(640, 480), (480, 640), (600, 450),
                                                     (100, 100), (2000, 100)])])
    groups = aspect_ratio_group_ids(frame, bins=3)
    assert groups[0] == groups[2] and len({groups[0], groups[1], groups[3], groups[4]}) == 4
    assert aspect_ratio_group_ids(frame, bins=[1.0]) == [1, 0, 1, 1, 1]


@pytest.mark.parametrize("batch_size,drop_last", [(3, False), (3, True), (4, False), (1, False)])
def test_grouped_batch_sampler(batch_size, drop_last):
    group_ids = [0, 1, 0, 2, 1, 0, 0, 2, 1, 1, 0, 2, 0, 1]
    order = list(torch.randperm(len(group_ids), generator=torch.Generator().manual_seed(0)))
    order = [int(i) for i in order]
    sampler = GroupedBatchSampler(order, group_ids, batch_size, drop_last)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    full = [b for b in batches if len(b) == batch_size]
    assert all(len(b) <= batch_size for b in batches)
    pure = [b for b in full if len({group_ids[i] for i in b}) == 1]
    # every group yields floor(n_g / batch_size) pure batches before the pooled leftovers
    counts = np.bincount(group_ids)
    assert len(pure) >= sum(c // batch_size for c in counts)
    seen = [i for b in batches for i in b]
    assert len(seen) == len(set(seen))
    if drop_last:
        assert len(seen) == len(group_ids) // batch_size * batch_size
    else:
        assert sorted(seen) == list(range(len(group_ids)))


def test_grouped_batch_sampler_pure_batches_first():
    group_ids = [0, 0, 1, 1, 0, 1, 0, 1]
    batches = list(GroupedBatchSampler(list(range(8)), group_ids, 3))
    assert batches == [[0, 1, 4], [2, 3, 5], [6, 7]]


def test_multiscale_is_deterministic_and_uses_every_size():
    scales = MultiScale([160, 192, 224], seed=1)
    picks = [scales.choose(i) for i in range(60)]
    assert picks == [MultiScale([160, 192, 224], seed=1).choose(i) for i in range(60)]
    assert set(picks) == {160, 192, 224}
    assert picks != [MultiScale([160, 192, 224], seed=2).choose(i) for i in range(60)]
    assert MultiScale([200]).choose(7) == 200


def test_collate_keeps_lists(tables):
    images, instances, categories, root = tables
    dataset = InstanceDataset(images, instances, categories, root, split="train")
    batch_images, targets = collate([dataset[0], dataset[1]])
    assert isinstance(batch_images, list) and len(batch_images) == 2
    assert [t["image_id"] for t in targets] == [1, 2]
