"""Panoptic FPN: Mask R-CNN's losses plus the semantic one, semantic targets that follow the
detector's resize and padding, the semantic map at the input size, config round trip,
stuff_classes required, Mask R-CNN checkpoints, and a few steps that lower the semantic loss."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from instseg_pipeline.models import (
    build_model,
    check_eval_output,
    check_losses,
    family,
    family_params,
    load_model,
    model_config,
    panoptic_fpn,
)
from instseg_pipeline.models.panoptic_fpn import norm_groups, semantic_maps

PARAMS = {"name": "panoptic_fpn_tiny", "min_size": 64, "max_size": 96, "stuff_classes": 2,
          "rpn_post_nms_top_n_train": 64, "box_batch_size_per_image": 16}
REPO = Path(__file__).resolve().parents[2]


def _sample(height: int = 72, width: int = 88, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """float [3, H, W]: blue sky above the middle row, green ground below, a red box on the
    seam; its target with ``semantic`` (1 sky, 2 ground, 0 the box)."""
    image = torch.rand(3, height, width, generator=torch.Generator().manual_seed(seed)) * 0.2
    image[2, :height // 2] += 0.8
    image[1, height // 2:] += 0.6
    y1, x1, y2, x2 = height // 3, width // 4, height * 2 // 3, width // 2
    masks = torch.zeros(1, height, width, dtype=torch.uint8)
    masks[0, y1:y2, x1:x2] = 1
    image[:, masks[0].bool()] = torch.tensor([0.9, 0.1, 0.1])[:, None]
    semantic = torch.ones(height, width, dtype=torch.int64)
    semantic[height // 2:] = 2
    semantic[masks[0].bool()] = 0
    return image, {"boxes": torch.tensor([[x1, y1, x2, y2]], dtype=torch.float32),
                   "labels": torch.tensor([1]), "masks": masks, "semantic": semantic}


def _model(seed: int = 0, **params):
    torch.manual_seed(seed)
    return build_model({**PARAMS, **params}, num_classes=3)


def test_train_mode_returns_mask_rcnn_losses_and_the_semantic_loss():
    model = _model().train()
    batch = [_sample(), _sample(96, 60, seed=1)]
    losses = model([image for image, _ in batch], [target for _, target in batch])
    check_losses(losses, family("panoptic_fpn_tiny").loss_names)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness",
                           "loss_rpn_box_reg", "loss_semantic"}
    # three classes with near-zero logits at init: 0.5 x log(3)
    assert losses["loss_semantic"].item() == pytest.approx(0.5 * math.log(3), rel=0.05)


def test_the_semantic_loss_weight_scales_the_loss_and_void_is_left_out():
    batch = [_sample()]
    images, targets = [image for image, _ in batch], [target for _, target in batch]
    half = _model(semantic_loss_weight=0.5).train()(images, targets)["loss_semantic"]
    full = _model(semantic_loss_weight=1.0).train()(images, targets)["loss_semantic"]
    assert full.item() == pytest.approx(2 * half.item(), rel=1e-5)
    void = [{**targets[0], "semantic": torch.full((72, 88), 255, dtype=torch.int64)}]
    assert _model().train()(images, void)["loss_semantic"].item() == 0.0
    unlabelled = [{k: v for k, v in targets[0].items() if k != "semantic"}]
    assert _model().train()(images, unlabelled)["loss_semantic"].item() == 0.0


@pytest.mark.parametrize(("semantic", "message"), [
    (torch.zeros(36, 44, dtype=torch.int64),
     r"target 0: 'semantic' must be an integer map of the image's size \[72, 88\]"),
    (torch.zeros(72, 88), r"got torch.float32"),
    (torch.full((72, 88), 3, dtype=torch.int64), r"labels \[3\] outside 0..S \(S = 2"),
])
def test_a_bad_semantic_target_is_named(semantic, message):
    image, target = _sample()
    with pytest.raises(ValueError, match=message):
        _model().train()([image], [{**target, "semantic": semantic}])


def test_semantic_targets_follow_the_resize_and_the_padding(monkeypatch):
    """60x80 is scaled by 2 (to 120x160) and 40x100 by 3 (to 120x300); the batch is padded
    to 128x320. Nearest resizing keeps every label where the image content went."""
    seen = []
    original = panoptic_fpn.semantic_targets

    def spy(*args, **kwargs):
        seen.append(original(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(panoptic_fpn, "semantic_targets", spy)
    model = _model(min_size=120, max_size=400).train()
    a = torch.ones(60, 80, dtype=torch.int64)
    a[30:] = 2
    a[:, 70:] = 255
    b = torch.ones(40, 100, dtype=torch.int64)
    b[10:20, 50:60] = 0
    targets = [{"boxes": torch.tensor([[5.0, 5.0, 20.0, 20.0]]), "labels": torch.tensor([1]),
                "masks": torch.zeros(1, *s.shape, dtype=torch.uint8), "semantic": s}
               for s in (a, b)]
    for target in targets:
        target["masks"][0, 5:20, 5:20] = 1
    model([torch.rand(3, 60, 80), torch.rand(3, 40, 100)], targets)
    (labels,) = seen
    assert labels.shape == (2, 128, 320) and labels.dtype == torch.int64
    expected = torch.full((2, 128, 320), 255, dtype=torch.int64)
    expected[0, :60, :140] = 1
    expected[0, 60:120, :140] = 2
    expected[1, :120, :300] = 1
    expected[1, 30:60, 150:180] = 0
    assert torch.equal(labels, expected)


def test_semantic_maps_crop_the_padding_before_resizing():
    logits = torch.zeros(1, 3, 128, 160)
    logits[0, 1, :120] = 5.0   # the resized image: stuff 1
    logits[0, 2, 120:] = 50.0  # padding rows: a label that must not leak in
    (semantic,) = semantic_maps(logits, [(120, 160)], [(60, 80)])
    assert semantic.shape == (60, 80) and semantic.dtype == torch.int64
    assert torch.equal(semantic, torch.ones(60, 80, dtype=torch.int64))


@pytest.mark.parametrize("size", [(72, 88), (96, 60)])
def test_eval_output_has_the_semantic_map_at_the_input_size(size):
    model = _model().eval()
    with torch.no_grad():
        (output,) = model([_sample(*size)[0]])
    check_eval_output(output, *size)  # semantic: int64 [H, W], 0..254
    assert output["semantic"].shape == size and output["semantic"].dtype == torch.int64
    assert 0 <= int(output["semantic"].min()) and int(output["semantic"].max()) <= 2


def test_model_config_round_trip_rebuilds_the_semantic_head():
    model = _model(seed=3, semantic_channels=16).eval()
    config = json.loads(json.dumps(model_config({**PARAMS, "semantic_channels": 16}, 3)))
    assert config["stuff_classes"] == 2 and config["semantic_channels"] == 16
    assert config["semantic_loss_weight"] == 0.5
    rebuilt = load_model(config, model.state_dict()).eval()
    assert rebuilt.semantic_head.predictor.out_channels == 3
    image, _ = _sample()
    with torch.no_grad():
        expected, actual = model([image])[0], rebuilt([image])[0]
    assert set(expected) == {"boxes", "labels", "scores", "masks", "semantic"}
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def test_stuff_classes_are_required_and_checked():
    with pytest.raises(ValueError, match=r"panoptic_fpn_tiny: training\.model\.stuff_classes "
                                         r"is missing; a Panoptic FPN model needs"):
        build_model({"name": "panoptic_fpn_tiny"}, 3)
    with pytest.raises(ValueError, match=r"stuff_classes is missing"):
        model_config({"name": "panoptic_fpn_resnet50"}, 3)
    with pytest.raises(ValueError, match=r"stuff_classes: expected an integer >= 1.*got 0"):
        build_model({**PARAMS, "stuff_classes": 0}, 3)
    with pytest.raises(ValueError, match=r"training\.model\.semantic_channels: expected an "
                                         r"integer >= 1"):
        build_model({**PARAMS, "semantic_channels": 0}, 3)


def test_the_parameters_block_builds_both_sizes():
    conf = yaml.safe_load((REPO / "conf/base/parameters_training.yml").read_text())
    families = conf["training"]["families"]
    assert families["panoptic_fpn"]["semantic_loss_weight"] == 0.5
    tiny = family_params({"name": "panoptic_fpn_tiny", "min_size": 64, "max_size": 96},
                         families)
    model = build_model({**tiny, "stuff_classes": 4}, 3)
    assert model.semantic_head.predictor.out_channels == 5
    assert model.semantic_loss_weight == 0.5
    assert model.roi_heads.detections_per_img == families["panoptic_fpn"][
        "box_detections_per_img"]
    resnet = family_params({"name": "panoptic_fpn_resnet50"}, families)
    assert model_config({**resnet, "stuff_classes": 4}, 3)["semantic_channels"] == 128
    assert norm_groups(128) == 32 and norm_groups(32) == 8


def test_a_panoptic_checkpoint_loads_whole(tmp_path):
    source = _model(seed=4)
    path = tmp_path / "panoptic.pt"
    torch.save({"model": source.state_dict()}, path)
    model = build_model({**PARAMS, "weights": str(path)}, 3)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())


def test_a_mask_rcnn_checkpoint_loads_into_all_but_the_semantic_head(tmp_path):
    torch.manual_seed(5)
    detector = build_model({"name": "maskrcnn_tiny"}, num_classes=6)
    path = tmp_path / "maskrcnn.pt"
    torch.save(detector.state_dict(), path)
    fresh = _model(seed=6)
    model = _model(seed=6, weights=str(path))  # the same init, then the checkpoint
    loaded, source = model.state_dict(), detector.state_dict()
    shared = [k for k in loaded if k in source and not k.startswith(
        ("roi_heads.box_predictor.", "roi_heads.mask_predictor."))]
    assert len(shared) > 40 and all(torch.equal(loaded[k], source[k]) for k in shared)
    head = [k for k in loaded if k.startswith("semantic_head.")]
    assert head and all(torch.equal(loaded[k], fresh.state_dict()[k]) for k in head)


def test_a_few_steps_lower_the_semantic_loss():
    model = _model(seed=7).train()
    batch = [_sample(), _sample(64, 96, seed=2)]
    images, targets = [image for image, _ in batch], [target for _, target in batch]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for _ in range(12):
        losses = model(images, targets)
        history.append(losses["loss_semantic"].item())
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    assert history[-1] < 0.5 * history[0], history


# --- overfit ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_overfits_four_synthetic_images_with_their_stuff(tmp_path):
    """Things and sky/ground through the engine, then the panoptic inference path
    (`combine_panoptic` of instances and the semantic map) scored by PQ against the tables."""
    from overfit import overfit_panoptic

    result = overfit_panoptic(tmp_path, {"name": "panoptic_fpn_tiny", "min_size": 128,
                                         "max_size": 128}, iters=300, lr=0.002)
    pq = result["pq"]
    assert pq["all"]["pq"] >= 0.8, pq
    assert pq["stuff"]["n"] == 2 and pq["stuff"]["pq"] >= 0.8, pq["stuff"]
    assert pq["things"]["n"] > 0
    assert result["model"]["stuff_classes"] == {1: "sky", 2: "ground"}
    history = result["history"]
    assert history["loss_semantic"].tail(20).mean() < history["loss_semantic"].head(20).mean() / 5
