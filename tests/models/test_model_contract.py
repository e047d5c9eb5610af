"""The model contract: every registered family, in train and eval mode, on images of two
sizes and a blank one; and the checker's own messages on outputs that break it. A semantic
family (Panoptic FPN) is built with stuff classes, trained with semantic targets and must
return its semantic map."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from instseg_pipeline.models import (
    ContractError,
    build_model,
    check_eval_output,
    check_losses,
    family,
    family_params,
)
from instseg_pipeline.models.registry import FAMILIES

SMALL = {"min_size": 64, "max_size": 96}
# few proposals and sampled RoIs keep the ResNet-50 Mask R-CNNs at about a second a pass;
# coarser SOLOv2 grids: its grid heads cost the same at any image size
MASK_RCNN_SMALL = {"rpn_post_nms_top_n_train": 64, "rpn_post_nms_top_n_test": 32,
                   "box_batch_size_per_image": 16}
FAMILY_BLOCKS = {"maskrcnn": MASK_RCNN_SMALL, "panoptic_fpn": MASK_RCNN_SMALL,
                 "solov2": {"num_grids": [12, 10, 8, 6, 4]}}
SIZES = [(72, 88), (96, 60)]
STUFF_CLASSES = 2  # a semantic family's S
MASK_RCNN_FAMILIES = {"maskrcnn_tiny", "maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2",
                      "maskrcnn_mobilenet_v3_large_fpn"}


def _scene(height: int, width: int) -> tuple[torch.Tensor, dict]:
    """float [3, H, W] with one bright rectangle, and its target (label 1; its semantic
    map: stuff 1 above the middle row, stuff 2 below, 0 on the rectangle)."""
    image = torch.rand(3, height, width, generator=torch.Generator().manual_seed(height))
    y1, x1, y2, x2 = height // 4, width // 5, height * 3 // 4, width * 3 // 5
    masks = torch.zeros(1, height, width, dtype=torch.uint8)
    masks[0, y1:y2, x1:x2] = 1
    image[:, masks[0].bool()] = 1.0
    semantic = torch.ones(height, width, dtype=torch.int64)
    semantic[height // 2:] = 2
    semantic[masks[0].bool()] = 0
    return image, {"boxes": torch.tensor([[x1, y1, x2, y2]], dtype=torch.float32),
                   "labels": torch.tensor([1]), "masks": masks, "semantic": semantic}


def _blank(height: int, width: int) -> tuple[torch.Tensor, dict]:
    """A black float [3, H, W] image and its empty target (a negative image)."""
    return torch.zeros(3, height, width), {
        "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
        "masks": torch.zeros(0, height, width, dtype=torch.uint8),
        "semantic": torch.ones(height, width, dtype=torch.int64)}


def _for(name: str, target: dict) -> dict:
    """``target`` as the family gets it: ``semantic`` only for a semantic family."""
    if family(name).semantic:
        return target
    return {k: v for k, v in target.items() if k != "semantic"}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def network(request):
    torch.manual_seed(0)
    params = family_params({"name": request.param, **SMALL}, FAMILY_BLOCKS)
    if family(request.param).semantic:
        params["stuff_classes"] = STUFF_CLASSES
    return request.param, build_model(params, num_classes=3)


def test_every_mask_rcnn_variant_is_registered():
    assert MASK_RCNN_FAMILIES <= set(FAMILIES)


def test_train_mode_returns_the_family_losses(network):
    name, model = network
    batch = [_scene(*SIZES[0]), _scene(*SIZES[1]), _blank(*SIZES[0])]
    model.train()
    losses = model([image for image, _ in batch], [_for(name, target) for _, target in batch])
    check_losses(losses, family(name).loss_names)
    assert all(torch.isfinite(value) for value in losses.values()), losses
    model.zero_grad()
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("size", SIZES)
def test_eval_mode_meets_the_contract_at_input_size(network, size):
    name, model = network
    images = [_scene(*size)[0], _blank(*size)[0]]
    model.eval()
    with torch.no_grad():
        outputs = model(images)
    assert len(outputs) == 2
    for output in outputs:
        check_eval_output(output, *size)
        assert output["masks"].shape[2:] == size
        if name in MASK_RCNN_FAMILIES:  # torchvision's detector adds nothing to the contract
            assert set(output) == {"boxes", "labels", "scores", "masks"}
        if family(name).semantic:  # checked by check_eval_output: int64 [H, W], 0..S
            assert output["semantic"].shape == size
            assert int(output["semantic"].max()) <= STUFF_CLASSES


def _valid_output(n: int = 2, height: int = 20, width: int = 30) -> dict:
    return {"boxes": torch.tensor([[1.0, 2.0, 10.0, 12.0], [0.0, 0.0, 30.0, 20.0]])[:n],
            "labels": torch.ones(n, dtype=torch.int64), "scores": torch.full((n,), 0.5),
            "masks": torch.full((n, 1, height, width), 0.25)}


def test_valid_outputs_pass_with_extras_and_as_numpy():
    assert check_eval_output(_valid_output(), 20, 30) == 2
    assert check_eval_output(_valid_output(0), 20, 30) == 0
    with_extra = {**_valid_output(), "embeddings": torch.zeros(5, 20, 30)}
    assert check_eval_output(with_extra, 20, 30) == 2
    semantic = {**_valid_output(), "semantic": torch.full((20, 30), 3, dtype=torch.int64)}
    assert check_eval_output(semantic, 20, 30) == 2
    as_numpy = {k: v.numpy() for k, v in _valid_output().items()}
    assert check_eval_output(as_numpy, 20, 30) == 2


@pytest.mark.parametrize(("key", "value", "message"), [
    ("labels", torch.ones(2, dtype=torch.int32), r"'labels': expected int64 \[2\], got torch.int32"),
    ("masks", torch.full((2, 1, 10, 15), 0.5), r"'masks': expected float \[2, 1, 20, 30\]"),
    ("masks", torch.full((2, 20, 30), 0.5), r"'masks': expected float \[2, 1, 20, 30\]"),
    ("masks", torch.full((2, 1, 20, 30), 3.0), r"'masks': values must lie in \[0.0, 1.0\]"),
    ("scores", torch.full((3,), 0.5), r"'scores': expected float \[2\]"),
    ("boxes", torch.ones(2, 5), r"'boxes': expected float \[N, 4\]"),
    ("boxes", torch.tensor([[5.0, 5.0, 3.0, 4.0], [0.0, 0.0, 1.0, 1.0]]), r"'boxes'.*xywh"),
    ("boxes", torch.tensor([[0.0, 0.0, 60.0, 20.0], [0.0, 0.0, 1.0, 1.0]]),
     r"'boxes': values must lie in"),
    ("scores", [0.5, 0.5], r"'scores': expected a tensor, got list"),
    ("semantic", torch.zeros(20, 30), r"'semantic': expected int64 \[20, 30\], got torch.float32"),
    ("semantic", torch.zeros(1, 20, 30, dtype=torch.int64),
     r"'semantic': expected int64 \[20, 30\]"),
    ("semantic", torch.full((20, 30), 255, dtype=torch.int64), r"'semantic': values must lie in"),
])
def test_broken_outputs_are_named_by_key(key, value, message):
    with pytest.raises(ContractError, match=message):
        check_eval_output({**_valid_output(), key: value}, 20, 30)


def test_missing_keys_and_bad_losses_are_named():
    output = _valid_output()
    del output["scores"]
    with pytest.raises(ContractError, match=r"lacks \['scores'\]"):
        check_eval_output(output, 20, 30)
    with pytest.raises(ContractError, match="expected a dict per image"):
        check_eval_output([_valid_output()], 20, 30)
    with pytest.raises(ContractError, match="'loss_mask': expected a scalar float tensor"):
        check_losses({"loss_box": torch.tensor(1.0), "loss_mask": torch.ones(2)})
    with pytest.raises(ContractError, match=r"the family declares \['loss_a', 'loss_b'\]"):
        check_losses({"loss_a": torch.tensor(1.0)}, ("loss_a", "loss_b"))
    check_losses({"loss_a": torch.tensor(1.0), "loss_b": torch.tensor(np.float32(2.0))},
                 ("loss_b", "loss_a"))
