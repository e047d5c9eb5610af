"""Pseudo-mask loss weights: the Dataset's ``mask_weights`` targets (with and without the
``mask_source`` column, through augmentation that drops instances) and every family's mask
loss honouring them (weight 1 = the unweighted loss exactly, weight 0 removes an instance's
term, a weighted training step runs)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scene_shapes import instance_row, rect
from torchvision.models.detection.roi_heads import maskrcnn_loss

from instseg_pipeline.config_schema import ConfigError, build
from instseg_pipeline.data.tables import make_categories, make_images, make_instances
from instseg_pipeline.engine.config import AugmentationConfig, TrainingConfig
from instseg_pipeline.models import build_model
from instseg_pipeline.models.contract import ContractError, mask_weights
from instseg_pipeline.models.maskrcnn import WeightedMaskRoIHeads, weighted_mask_loss
from instseg_pipeline.torchdata.augment import build_augmentation
from instseg_pipeline.torchdata.dataset import InstanceDataset, collate

H, W = 64, 80


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- the Dataset -------------------------------------------------------------------------------

def _tables(tmp_path, sources=("annotated", "grabcut"), column=True):
    """One train image with instance A (category 7, top left) and B (category 3, bottom
    right) of the given mask sources, one val image with an annotated instance."""
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(tmp_path / name)
    images = make_images([
        {"image_id": 1, "file_name": "a.png", "width": W, "height": H, "split": "train",
         "source": "test"},
        {"image_id": 2, "file_name": "b.png", "width": W, "height": H, "split": "val",
         "source": "test"}])
    rows = [instance_row(10, 1, 7, rect(H, W, 4, 4, 30, 24)),
            instance_row(11, 1, 3, rect(H, W, 50, 36, 76, 60)),
            instance_row(12, 2, 7, rect(H, W, 10, 10, 30, 30))]
    for row, source in zip(rows, (*sources, "annotated")):
        row["mask_source"] = source
    instances = make_instances(rows)
    if not column:
        instances = instances.drop(columns="mask_source")
    categories = make_categories([
        {"category_id": 7, "name": "seven", "supercategory": "x", "isthing": True},
        {"category_id": 3, "name": "three", "supercategory": "x", "isthing": True}])
    return images, instances, categories


def _target(tables, root, weight, augmentation=None):
    images, instances, categories = tables
    dataset = InstanceDataset(images, instances, categories, root, split="train",
                              augmentation=augmentation, pseudo_mask_weight=weight)
    return dataset, dataset[0][1]


def _same_target(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b[key]), key
        else:
            assert value == b[key], key


def test_pseudo_instances_get_the_weight(tmp_path):
    dataset, target = _target(_tables(tmp_path), tmp_path, 0.25)
    assert dataset.mask_weighted
    assert target["mask_weights"].dtype == torch.float32
    labels = {dataset.mapping[7]: 1.0, dataset.mapping[3]: 0.25}  # A annotated, B grabcut
    assert target["mask_weights"].tolist() == [labels[int(k)] for k in target["labels"]]


@pytest.mark.parametrize("case", ["no_column", "weight_one", "all_annotated"])
def test_targets_unchanged_without_a_weight_other_than_one(tmp_path, case):
    sources = ("annotated", "annotated") if case == "all_annotated" else ("grabcut", "box")
    tables = _tables(tmp_path, sources, column=case != "no_column")
    dataset, target = _target(tables, tmp_path, 1.0 if case == "weight_one" else 0.5)
    assert not dataset.mask_weighted and "mask_weights" not in target
    # bit-identical to the targets of the tables without the column at the default weight
    _, plain = _target(_tables(tmp_path, column=False), tmp_path, 1.0)
    _same_target(target, plain)


def _crop_to(x_max: int, y_max: int, x_min: int = 0, y_min: int = 0):
    config = build(AugmentationConfig, {"transforms": [
        {"name": "Crop", "x_min": x_min, "y_min": y_min, "x_max": x_max, "y_max": y_max}]},
        "training.augmentation")
    return build_augmentation(config)


@pytest.mark.parametrize("sources, kept_corner, expected", [
    (("annotated", "grabcut"), "top_left", 1.0),
    (("annotated", "grabcut"), "bottom_right", 0.5),
    (("box", "annotated"), "top_left", 0.5),
    (("box", "annotated"), "bottom_right", 1.0)])
def test_weights_follow_the_instances_augmentation_keeps(tmp_path, sources, kept_corner,
                                                         expected):
    crop = _crop_to(40, 32) if kept_corner == "top_left" else _crop_to(W, H, 40, 32)
    dataset, target = _target(_tables(tmp_path, sources), tmp_path, 0.5, crop)
    assert len(target["labels"]) == 1  # the crop drops the other instance
    category = 7 if kept_corner == "top_left" else 3
    assert int(target["labels"][0]) == dataset.mapping[category]
    assert target["mask_weights"].tolist() == [expected]


def test_every_instance_dropped_leaves_empty_weights(tmp_path):
    _, target = _target(_tables(tmp_path), tmp_path, 0.5, _crop_to(45, 30, 35, 26))
    assert len(target["labels"]) == 0
    assert target["mask_weights"].shape == (0,) and target["mask_weights"].dtype == torch.float32


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_config_refuses_a_weight_outside_0_1(value):
    with pytest.raises(ConfigError, match="training.pseudo_mask_loss_weight"):
        TrainingConfig.from_params({"checkpoint_dir": "x", "pseudo_mask_loss_weight": value})


def test_config_default_is_one():
    assert TrainingConfig.from_params({"checkpoint_dir": "x"}).pseudo_mask_loss_weight == 1.0


# --- the contract ------------------------------------------------------------------------------

def test_contract_mask_weights():
    base = {"labels": torch.tensor([1, 2]), "image_id": 5}
    assert mask_weights(base) is None
    assert mask_weights({**base, "mask_weights": torch.ones(2)}) is None
    weights = torch.tensor([1.0, 0.5])
    assert mask_weights({**base, "mask_weights": weights}) is weights
    with pytest.raises(ContractError, match=r"image_id 5.*float \[2\]"):
        mask_weights({**base, "mask_weights": torch.ones(3)})
    with pytest.raises(ContractError, match="finite and >= 0"):
        mask_weights({**base, "mask_weights": torch.tensor([1.0, -1.0])})


# --- the families ------------------------------------------------------------------------------

IMAGE_H, IMAGE_W = 96, 128
FAMILIES = {
    "maskrcnn_tiny": ({"min_size": 96, "max_size": 128}, ("loss_mask",)),
    "panoptic_fpn_tiny": ({"min_size": 96, "max_size": 128, "stuff_classes": 1},
                          ("loss_mask",)),
    "yolact_tiny": ({"min_size": 96, "max_size": 128}, ("loss_mask", "loss_maskiou")),
    "solov2_tiny": ({"min_size": 96, "max_size": 128, "mask_loss_stride": 2},
                    ("loss_mask",)),
    "simpleseg_tiny": ({"min_size": 96, "max_size": 128}, ("loss_offset",)),
}


def _family_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    params, _ = FAMILIES[name]
    return build_model({"name": name, **params}, 3).train()


def _scene(weights=None):
    """One image with two rectangles (labels 1 and 2), as the Dataset makes targets."""
    image = torch.rand(3, IMAGE_H, IMAGE_W, generator=torch.Generator().manual_seed(1))
    masks = np.stack([rect(IMAGE_H, IMAGE_W, 10, 12, 50, 60),
                      rect(IMAGE_H, IMAGE_W, 64, 30, 120, 88)])
    target = {"boxes": torch.tensor([[10.0, 12, 50, 60], [64, 30, 120, 88]]),
              "labels": torch.tensor([1, 2]), "masks": torch.from_numpy(masks),
              "image_id": 1, "area": torch.tensor([1920.0, 3248.0]),
              "iscrowd": torch.zeros(2, dtype=torch.int64),
              "semantic": torch.ones(IMAGE_H, IMAGE_W, dtype=torch.int64)}
    target["semantic"][torch.from_numpy(masks.any(0))] = 0
    if weights is not None:
        target["mask_weights"] = torch.tensor(weights, dtype=torch.float32)
    return [image], [target]


def _losses(model, weights=None) -> dict:
    torch.manual_seed(123)  # the ROI / positive sampling draws from torch's RNG
    images, targets = _scene(weights)
    return {k: v.detach() for k, v in model(images, targets).items()}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_losses(request):
    """{weights: losses} of one family's untrained network on `_scene`."""
    name = request.param
    model = _family_model(name)
    runs = {w: _losses(model, None if w is None else list(w))
            for w in (None, (1.0, 1.0), (1.0, 0.0), (0.0, 1.0), (0.0, 0.0), (0.5, 0.5))}
    return name, runs


def test_weights_one_are_the_unweighted_loss_exactly(family_losses):
    _, runs = family_losses
    for key, value in runs[None].items():
        assert torch.equal(value, runs[(1.0, 1.0)][key]), key


def test_weights_scale_each_instance_term(family_losses):
    name, runs = family_losses
    _, weighted = FAMILIES[name]
    full = runs[None]
    for key in weighted:
        assert full[key] > 0, key
        # each instance's term times its weight over an unchanged normaliser: linear
        torch.testing.assert_close(runs[(1.0, 0.0)][key] + runs[(0.0, 1.0)][key], full[key],
                                   rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(runs[(0.5, 0.5)][key], 0.5 * full[key],
                                   rtol=1e-5, atol=1e-7)
        assert float(runs[(0.0, 0.0)][key]) == 0.0, key
        assert 0 < runs[(1.0, 0.0)][key] < full[key], key
    # the losses that do not read the masks' weights stay as they are
    unweighted = set(full) - set(weighted) - ({"loss_semantic"} if name == "simpleseg_tiny"
                                              else set())
    for key in unweighted:
        assert torch.equal(runs[(0.0, 1.0)][key], full[key]), key


def test_simpleseg_semantic_loss_falls_with_the_weights():
    """The hard-pixel semantic loss is not linear in the weights (the hardest share is
    taken of the weighted pixels), but lower weights can only lower it."""
    model = _family_model("simpleseg_tiny")
    full = _losses(model)["loss_semantic"]
    assert _losses(model, [1.0, 0.0])["loss_semantic"] <= full
    assert _losses(model, [0.0, 0.0])["loss_semantic"] < full


def test_maskrcnn_loss_function_matches_torchvision():
    torch.manual_seed(0)
    logits = torch.randn(5, 3, 14, 14)
    proposals = [torch.tensor([[2.0, 2, 30, 30], [5, 5, 25, 35], [40, 40, 60, 60]]),
                 torch.tensor([[0.0, 0, 20, 20], [10, 10, 50, 40]])]
    gt_masks = [torch.from_numpy(np.stack([rect(64, 64, 4, 4, 28, 30),
                                           rect(64, 64, 38, 40, 62, 62)])),
                torch.from_numpy(rect(64, 64, 8, 8, 45, 40))[None]]
    gt_labels = [torch.tensor([1, 2]), torch.tensor([2])]
    matched = [torch.tensor([0, 0, 1]), torch.tensor([0, 0])]
    ones = [torch.ones(2), torch.ones(1)]
    reference = maskrcnn_loss(logits, proposals, gt_masks, gt_labels, matched)
    torch.testing.assert_close(
        weighted_mask_loss(logits, proposals, gt_masks, gt_labels, matched, ones), reference)
    # instance 1 of image 0 (one ROI of five) at weight 0: the other four ROIs over five
    without = weighted_mask_loss(logits, proposals, gt_masks, gt_labels, matched,
                                 [torch.tensor([1.0, 0.0]), torch.ones(1)])
    keep = [torch.tensor([0, 1]), torch.tensor([0, 1])]
    rest = maskrcnn_loss(torch.cat([logits[:2], logits[3:]]),
                         [p[k] for p, k in zip(proposals, keep)], gt_masks, gt_labels,
                         [m[k] for m, k in zip(matched, keep)])
    torch.testing.assert_close(without, rest * 4 / 5)


def test_maskrcnn_family_uses_the_weighted_heads():
    assert isinstance(_family_model("maskrcnn_tiny").roi_heads, WeightedMaskRoIHeads)
    assert isinstance(_family_model("panoptic_fpn_tiny").roi_heads, WeightedMaskRoIHeads)


def test_maskrcnn_eval_output_unchanged_by_the_heads():
    from torchvision.models.detection.roi_heads import RoIHeads

    model = _family_model("maskrcnn_tiny").eval()
    images, _ = _scene()
    with torch.no_grad():
        weighted = model(images)
        model.roi_heads.__class__ = RoIHeads
        plain = model(images)
    for key in ("boxes", "labels", "scores", "masks"):
        assert torch.equal(weighted[0][key], plain[0][key]), key


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_weighted_training_step(tmp_path, name):
    """Dataset targets with mask_weights through collate, backward and an optimizer step."""
    tables = _tables(tmp_path, ("annotated", "grabcut"))
    dataset = InstanceDataset(*tables, tmp_path, split="train", pseudo_mask_weight=0.3,
                              semantic=name == "panoptic_fpn_tiny")
    images, targets = collate([dataset[0]])
    assert targets[0]["mask_weights"].tolist() == pytest.approx(
        [1.0 if int(c) == dataset.mapping[7] else 0.3 for c in targets[0]["labels"]])
    model = _family_model(name)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    before = [p.detach().clone() for p in model.parameters()]
    losses = model(images, targets)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


# --- through fit -------------------------------------------------------------------------------

def _fit_config(tmp_path, weight: float) -> TrainingConfig:
    return TrainingConfig.from_params({
        "checkpoint_dir": str(tmp_path / f"ckpt_{weight}"), "max_iters": 2, "batch_size": 1,
        "device": "cpu", "threads": 1, "augmentation": {"preset": "none"},
        "group_aspect_ratio": False, "selection": {"every_epochs": 0}, "val_max_images": 0,
        "progress_bar": False, "log_every": 0, "checkpoint_every": 0,
        "log_model_to_mlflow": False, "warmup_iters": 0,
        "model": {"name": "maskrcnn_tiny", "min_size": 64, "max_size": 80},
        "pseudo_mask_loss_weight": weight})


def test_fit_trains_with_the_pseudo_mask_weight(tmp_path):
    """``training.pseudo_mask_loss_weight`` reaches the train targets through `fit`, and
    the mask head learns differently with it (same seed, same data)."""
    from instseg_pipeline.engine.fit import build_datasets, fit

    images, instances, categories = _tables(tmp_path, ("annotated", "grabcut"))
    train_set, val_set = build_datasets(images, instances, categories, tmp_path,
                                        _fit_config(tmp_path, 0.3))
    assert train_set.mask_weighted and not val_set.mask_weighted
    assert sorted(train_set[0][1]["mask_weights"].tolist()) == pytest.approx([0.3, 1.0])
    key = "roi_heads.mask_predictor.mask_fcn_logits.weight"
    weighted = fit(images, instances, categories, tmp_path, _fit_config(tmp_path, 0.3))
    plain = fit(images, instances, categories, tmp_path, _fit_config(tmp_path, 1.0))
    assert weighted["model"]["iterations"] == 2
    assert not torch.equal(weighted["model"]["state_dict"][key],
                           plain["model"]["state_dict"][key])
