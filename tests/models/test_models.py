"""Model factory: parameters reach the network, weights and configs load (the train step and
prediction of every family: test_model_contract.py)."""
from __future__ import annotations

import json

import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

from instseg_pipeline.models import WeightsError, build_model, load_model, model_config
from instseg_pipeline.models.weights import (
    FasterRCNN_MobileNet_V3_Large_FPN_Weights,
    cached_weights_path,
)

# few proposals and sampled RoIs: the R50 mask head on 128 positive RoIs alone costs ~60 GMAC
SMALL = {"min_size": 64, "max_size": 96, "rpn_post_nms_top_n_train": 64,
         "rpn_post_nms_top_n_test": 32, "box_batch_size_per_image": 16}


def _sample(size=(72, 88)):
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(3, *size, generator=generator)
    masks = torch.zeros(2, *size, dtype=torch.uint8)
    masks[0, 10:40, 8:50] = 1
    masks[1, 30:70, 55:85] = 1
    image[:, masks[0].bool()] = torch.tensor([1.0, 0.0, 0.0])[:, None]
    target = {"boxes": torch.tensor([[8.0, 10, 50, 40], [55, 30, 85, 70]]),
              "labels": torch.tensor([1, 2]), "masks": masks}
    return image, target


@pytest.fixture(autouse=True)
def _no_hub_cache(tmp_path, monkeypatch):
    """An empty torch cache: nothing here may come from (or go to) the network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


def test_detector_parameters_reach_the_model():
    model = build_model({
        "name": "maskrcnn_tiny", "min_size": [96, 128], "max_size": 200,
        "rpn_pre_nms_top_n_train": 111, "rpn_pre_nms_top_n_test": 77,
        "rpn_post_nms_top_n_train": 55, "rpn_post_nms_top_n_test": 33,
        "rpn_batch_size_per_image": 64, "rpn_positive_fraction": 0.4,
        "roi_batch_size_per_image": 32, "box_positive_fraction": 0.3,
        "bbox_reg_weights": [5.0, 5.0, 2.5, 2.5], "box_detections_per_img": 17,
        "box_score_thresh": 0.2}, num_classes=4)
    assert model.transform.min_size == (96, 128) and model.transform.max_size == 200
    assert model.rpn._pre_nms_top_n == {"training": 111, "testing": 77}
    assert model.rpn._post_nms_top_n == {"training": 55, "testing": 33}
    assert model.rpn.fg_bg_sampler.batch_size_per_image == 64
    assert model.rpn.fg_bg_sampler.positive_fraction == 0.4
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 32
    assert model.roi_heads.fg_bg_sampler.positive_fraction == 0.3
    assert model.roi_heads.box_coder.weights == (5.0, 5.0, 2.5, 2.5)
    assert model.roi_heads.detections_per_img == 17
    assert model.roi_heads.score_thresh == 0.2
    assert model.roi_heads.box_predictor.cls_score.out_features == 4


def test_null_parameters_mean_defaults():
    params = {**SMALL, "name": "maskrcnn_resnet50_fpn", "weights": None,
              "bbox_reg_weights": None, "trainable_backbone_layers": None, "min_size": None}
    model = build_model(params, 3)
    assert model.transform.min_size == (800,)
    assert all(p.requires_grad for p in model.backbone.parameters())
    assert model_config(params, 3)["trainable_backbone_layers"] == 5


def test_unknown_parameter_and_name_are_errors():
    with pytest.raises(ValueError, match="rpn_pre_nms_topn_train"):
        build_model({"name": "maskrcnn_tiny", "rpn_pre_nms_topn_train": 10}, 3)
    with pytest.raises(ValueError, match="both"):
        build_model({"box_batch_size_per_image": 8, "roi_batch_size_per_image": 8}, 3)
    with pytest.raises(ValueError, match="maskrcnn_r101"):
        build_model({"name": "maskrcnn_r101"}, 3)


def test_torchvision_weight_names_are_never_downloaded():
    with pytest.raises(WeightsError, match="cannot be downloaded here.*local checkpoint"):
        build_model({"name": "maskrcnn_resnet50_fpn", "weights": "DEFAULT"}, 3)
    with pytest.raises(WeightsError, match="not a torchvision weights name"):
        build_model({"name": "maskrcnn_tiny", "weights": "COCO_V1"}, 3)
    with pytest.raises(WeightsError, match="no such file"):
        build_model({"name": "maskrcnn_resnet50_fpn", "weights": "COCO_V9"}, 3)


def test_checkpoint_with_other_class_count_swaps_the_predictors(tmp_path):
    torch.manual_seed(1)
    source = build_model({"name": "maskrcnn_tiny"}, num_classes=6)
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": source.state_dict(), "epoch": 3}, path)
    model = build_model({"name": "maskrcnn_tiny", "weights": str(path)}, num_classes=3)
    assert model.roi_heads.box_predictor.cls_score.out_features == 3
    assert model.roi_heads.box_predictor.bbox_pred.out_features == 12
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 3
    fresh, loaded = source.state_dict(), model.state_dict()
    shared = [k for k in loaded if not k.startswith(("roi_heads.box_predictor.",
                                                     "roi_heads.mask_predictor."))]
    assert len(shared) > 40
    assert all(torch.equal(loaded[k], fresh[k]) for k in shared)


def test_raw_state_dict_with_same_classes_loads_everything(tmp_path):
    source = build_model({"name": "maskrcnn_tiny"}, num_classes=3)
    path = tmp_path / "raw.pt"
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, path)
    model = build_model({"name": "maskrcnn_tiny", "weights": str(path)}, num_classes=3)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(build_model({"name": "maskrcnn_tiny"}, 3).state_dict(), path)
    with pytest.raises(WeightsError, match="does not fit"):
        build_model({"name": "maskrcnn_mobilenet_v3_large_fpn", "weights": str(path)}, 3)
    torch.save({"optimizer": {"lr": 0.1}}, path)
    with pytest.raises(WeightsError, match="neither a state_dict"):
        build_model({"name": "maskrcnn_tiny", "weights": str(path)}, 3)


def test_cached_torchvision_weights_load_and_freeze_batchnorm(tmp_path):
    # a detection-only MobileNet checkpoint of 91 classes placed where torch's cache keeps it
    torch.manual_seed(2)
    source = build_model({"name": "maskrcnn_mobilenet_v3_large_fpn"}, num_classes=91)
    state = {k: v for k, v in source.state_dict().items() if ".mask_" not in k}
    cached = cached_weights_path(FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1)
    cached.parent.mkdir(parents=True)
    torch.save(state, cached)
    model = build_model({"name": "maskrcnn_mobilenet_v3_large_fpn", "weights": "COCO_V1",
                         **SMALL}, num_classes=3)
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    frozen = [n for n, p in model.backbone.body.named_parameters() if not p.requires_grad]
    assert frozen  # trainable_backbone_layers defaults to 3 with pretrained weights
    loaded = model.state_dict()
    key = "backbone.fpn.inner_blocks.0.0.weight"
    assert torch.equal(loaded[key], state[key])
    assert model.roi_heads.box_predictor.cls_score.out_features == 3


def test_model_config_round_trip():
    params = {"name": "maskrcnn_tiny", "min_size": 64, "max_size": 96,
              "roi_batch_size_per_image": 48, "bbox_reg_weights": (10.0, 10.0, 5.0, 5.0)}
    torch.manual_seed(3)
    model = build_model(params, num_classes=3).eval()
    config = json.loads(json.dumps(model_config(params, 3)))
    assert config["num_classes"] == 3 and config["box_batch_size_per_image"] == 48
    rebuilt = load_model(config, model.state_dict()).eval()
    assert rebuilt.roi_heads.box_coder.weights == (10.0, 10.0, 5.0, 5.0)
    image, _ = _sample()
    with torch.no_grad():
        expected, actual = model([image])[0], rebuilt([image])[0]
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    with pytest.raises(WeightsError):
        load_model({**config, "num_classes": 5}, model.state_dict())
