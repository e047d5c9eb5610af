"""The Mask R-CNN families: torchvision's architectures, their ONNX tracing hook and the
postprocessing cuts the parity check reads."""
from __future__ import annotations

import warnings

import pytest
import torch
from torchvision.models.detection import (
    FasterRCNN_MobileNet_V3_Large_FPN_Weights,
    MaskRCNN_ResNet50_FPN_V2_Weights,
    MaskRCNN_ResNet50_FPN_Weights,
)

from instseg_pipeline.models import build_model, family, family_of
from instseg_pipeline.models.maskrcnn import LOSS_NAMES, eager_exact_resize

COCO_CLASSES = 91
# sizes where torchvision's traced (float32) resize lands a pixel away from eager's,
# for min_size 128, max_size 192
RESIZE_TRAPS = [(98, 131), (194, 96), (97, 103), (103, 103), (96, 173), (640, 586)]


def _count(model: torch.nn.Module, skip: tuple[str, ...] = ()) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith(skip))


# torchvision counts its pretrained models, whose FrozenBatchNorm holds buffers, not parameters
@pytest.mark.parametrize(("name", "frozen", "weights", "skip"), [
    ("maskrcnn_resnet50_fpn", True, MaskRCNN_ResNet50_FPN_Weights.COCO_V1, ()),
    ("maskrcnn_resnet50_fpn_v2", False, MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1, ()),
    # torchvision's MobileNet detector has no mask branch: ours is it plus a mask head
    ("maskrcnn_mobilenet_v3_large_fpn", True, FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1,
     ("roi_heads.mask_head.", "roi_heads.mask_predictor.")),
])
def test_torchvision_variants_have_torchvision_parameter_counts(name, frozen, weights, skip):
    model = build_model({"name": name, "frozen_batchnorm": frozen}, COCO_CLASSES)
    assert _count(model, skip) == weights.meta["num_params"]


def test_every_mask_rcnn_family_shares_losses_tracing_and_parameters():
    # the engine's loss_weights in parameters_training.yml use these names
    assert set(LOSS_NAMES) == {"loss_classifier", "loss_box_reg", "loss_mask",
                               "loss_objectness", "loss_rpn_box_reg"}
    names = ["maskrcnn_tiny", "maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2",
             "maskrcnn_mobilenet_v3_large_fpn"]
    for entry in map(family, names):
        assert entry.loss_names == LOSS_NAMES
        assert entry.onnx.exportable and entry.onnx.exporter == "torchscript"
        assert entry.onnx.tracing is eager_exact_resize
        assert {"min_size", "roi_batch_size_per_image", "frozen_batchnorm"} <= set(entry.keys)


def test_postprocess_cuts_are_the_roi_heads_settings():
    model = build_model({"name": "maskrcnn_tiny", "box_score_thresh": 0.3,
                         "box_detections_per_img": 7}, 3)
    assert family_of(model).postprocess_cuts(model) == {"score_threshold": 0.3,
                                                        "detections_per_img": 7}


def _traced_resize(network, example: torch.Tensor):
    """``network.transform.resize`` traced on ``example``: image [3, H, W] -> [3, h, w]."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about python-side shape arithmetic
        return torch.jit.trace(lambda image: network.transform.resize(image)[0], example)


def test_tracing_hook_makes_the_traced_resize_size_eager_and_leaves_eager_alone():
    network = build_model({"name": "maskrcnn_tiny", "min_size": 128, "max_size": 192}, 3)
    transform = network.eval().transform
    example = torch.rand(3, 144, 176)
    plain = _traced_resize(network, example)
    with eager_exact_resize(network):
        exact = _traced_resize(network, example)
        hooked = [transform.resize(torch.rand(3, *size))[0] for size in RESIZE_TRAPS]
    assert "resize" not in vars(transform)  # the class's method is back
    for size, hooked_eager in zip(RESIZE_TRAPS, hooked):
        image = torch.rand(3, *size)
        eager = transform.resize(image)[0].shape
        assert hooked_eager.shape == eager, size
        assert exact(image).shape == eager, size
        assert plain(image).shape != eager, size  # the trap the hook exists for


def test_tracing_hook_leaves_a_fixed_size_transform_alone():
    network = build_model({"name": "maskrcnn_tiny"}, 3)
    network.transform.fixed_size = (64, 64)
    with eager_exact_resize(network) as entered:
        assert entered is network and "resize" not in vars(network.transform)
