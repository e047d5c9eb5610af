"""``maskrcnn_tiny``: a small from-scratch Mask R-CNN that trains on two CPU threads.

Backbone: a stem and three stages of GroupNorm convs (32-64-128-256 channels, strides
4/8/16) feeding a 64-channel FPN (+ a max-pooled level at stride 32). GroupNorm rather than
BatchNorm because CPU batches hold one or two images. Heads: a 256-wide two-layer box head
and a mask head of two 64-channel convs. Anchors 16-128 px suit 160-320 px images.

A Mask R-CNN family (`FAMILY`): the same parameters, losses and ONNX tracing as the
torchvision variants in `instseg_pipeline.models.maskrcnn`.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from instseg_pipeline.models.maskrcnn import mask_rcnn_family

STAGE_CHANNELS = (32, 64, 128, 256)
FPN_CHANNELS = 64
BOX_REPRESENTATION = 256
MASK_LAYERS = (64, 64)
FEATURE_NAMES = ["0", "1", "2"]

# smaller proposal and sampling budgets than torchvision's COCO defaults: few objects per image
TINY_DEFAULTS = {
    "min_size": 256, "max_size": 512,
    "rpn_pre_nms_top_n_train": 600, "rpn_post_nms_top_n_train": 300,
    "rpn_pre_nms_top_n_test": 300, "rpn_post_nms_top_n_test": 150,
    "rpn_batch_size_per_image": 128, "box_batch_size_per_image": 64,
}


def _conv(in_ch: int, out_ch: int, stride: int = 1) -> nn.Sequential:
    """3x3 conv + GroupNorm(8) + ReLU."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False),
                         nn.GroupNorm(8, out_ch), nn.ReLU(inplace=True))


def _stage(in_ch: int, out_ch: int) -> nn.Sequential:
    """Halve the resolution, then one more conv at the new width."""
    return nn.Sequential(_conv(in_ch, out_ch, stride=2), _conv(out_ch, out_ch))


class TinyBackbone(nn.Module):
    """``images float32 [B, 3, H, W] -> {"0": stride 4, "1": 8, "2": 16, "pool": 32}``.

    Every level has ``out_channels`` channels (the FPN width).
    """

    def __init__(self, channels: tuple[int, ...] = STAGE_CHANNELS,
                 out_channels: int = FPN_CHANNELS):
        super().__init__()
        c0, c1, c2, c3 = channels
        # one conv at stride 2: a second full-resolution conv would cost as much as a stage
        self.stem = _conv(3, c0, stride=2)
        self.stages = nn.ModuleList([_stage(c0, c1), _stage(c1, c2), _stage(c2, c3)])
        self.fpn = FeaturePyramidNetwork([c1, c2, c3], out_channels,
                                         extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        x = self.stem(images)
        features = OrderedDict()
        for name, stage in zip(FEATURE_NAMES, self.stages):
            x = stage(x)
            features[name] = x
        return self.fpn(features)


def build_tiny(num_classes: int, spec: dict, detector_kwargs: dict) -> MaskRCNN:
    """The tiny Mask R-CNN; ``detector_kwargs`` are MaskRCNN keyword arguments.

    ``spec`` (backbone freezing, batch-norm kind) does not apply: nothing is pretrained.
    """
    backbone = TinyBackbone()
    anchors = AnchorGenerator(sizes=((16,), (32,), (64,), (128,)),
                              aspect_ratios=((0.5, 1.0, 2.0),) * 4)
    box_pool = MultiScaleRoIAlign(FEATURE_NAMES, output_size=7, sampling_ratio=2)
    mask_pool = MultiScaleRoIAlign(FEATURE_NAMES, output_size=14, sampling_ratio=2)
    model = MaskRCNN(
        backbone, num_classes=None,
        rpn_anchor_generator=anchors, box_roi_pool=box_pool, mask_roi_pool=mask_pool,
        box_head=TwoMLPHead(FPN_CHANNELS * 7 * 7, BOX_REPRESENTATION),
        box_predictor=FastRCNNPredictor(BOX_REPRESENTATION, num_classes),
        mask_head=MaskRCNNHeads(FPN_CHANNELS, MASK_LAYERS, 1),
        mask_predictor=MaskRCNNPredictor(MASK_LAYERS[-1], MASK_LAYERS[-1], num_classes),
        **{**TINY_DEFAULTS, **detector_kwargs})
    # torchvision's fan-out init with few classes starts the mask loss near 5; small logits
    # start it at log(2)
    nn.init.normal_(model.roi_heads.mask_predictor.mask_fcn_logits.weight, std=0.001)
    return model


# nothing pretrained: no backbone stages to freeze
FAMILY = mask_rcnn_family("maskrcnn_tiny", build_tiny)
