"""torchvision Mask R-CNN variants built without downloading anything.

The builders assemble the same architectures as torchvision's ``maskrcnn_resnet50_fpn``
(v1, v2) with backbone weights None; pretrained weights are loaded afterwards by
`instseg_pipeline.models.weights`. torchvision has no Mask R-CNN on MobileNetV3, so
``maskrcnn_mobilenet_v3_large_fpn`` is its Faster R-CNN MobileNetV3-FPN plus a mask head
(its COCO detection weights load into everything but the mask branch).

``spec`` keys used here: frozen_batchnorm (bool), trainable_backbone_layers (int).
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torchvision.models import mobilenet_v3_large, resnet50
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import _mobilenet_extractor, _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, _default_anchorgen
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.misc import FrozenBatchNorm2d

# how many backbone stages exist (all trainable when training from scratch)
MAX_TRAINABLE_LAYERS = {"maskrcnn_resnet50_fpn": 5, "maskrcnn_resnet50_fpn_v2": 5,
                        "maskrcnn_mobilenet_v3_large_fpn": 6}


def _norm(spec: dict) -> Callable[..., nn.Module]:
    return FrozenBatchNorm2d if spec["frozen_batchnorm"] else nn.BatchNorm2d


def build_resnet50_fpn(num_classes: int, spec: dict, detector_kwargs: dict) -> MaskRCNN:
    """torchvision's original Mask R-CNN ResNet-50-FPN architecture."""
    body = resnet50(weights=None, norm_layer=_norm(spec))
    backbone = _resnet_fpn_extractor(body, spec["trainable_backbone_layers"])
    return MaskRCNN(backbone, num_classes=num_classes, **detector_kwargs)


def build_resnet50_fpn_v2(num_classes: int, spec: dict, detector_kwargs: dict) -> MaskRCNN:
    """The v2 recipe: BatchNorm in FPN and heads, two-conv RPN head, 4conv1fc box head."""
    body = resnet50(weights=None, norm_layer=_norm(spec))
    backbone = _resnet_fpn_extractor(body, spec["trainable_backbone_layers"],
                                     norm_layer=nn.BatchNorm2d)
    anchors = _default_anchorgen()
    channels = backbone.out_channels
    return MaskRCNN(
        backbone, num_classes=num_classes, rpn_anchor_generator=anchors,
        rpn_head=RPNHead(channels, anchors.num_anchors_per_location()[0], conv_depth=2),
        box_head=FastRCNNConvFCHead((channels, 7, 7), [256] * 4, [1024],
                                    norm_layer=nn.BatchNorm2d),
        mask_head=MaskRCNNHeads(channels, [256] * 4, 1, norm_layer=nn.BatchNorm2d),
        **detector_kwargs)


def build_mobilenet_v3_large_fpn(num_classes: int, spec: dict,
                                 detector_kwargs: dict) -> MaskRCNN:
    """MobileNetV3-Large FPN (two levels + pool, 5 anchor sizes each) with a mask head."""
    body = mobilenet_v3_large(weights=None, norm_layer=_norm(spec))
    backbone = _mobilenet_extractor(body, True, spec["trainable_backbone_layers"])
    anchors = AnchorGenerator(((32, 64, 128, 256, 512),) * 3, ((0.5, 1.0, 2.0),) * 3)
    return MaskRCNN(
        backbone, num_classes=num_classes, rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(["0", "1"], output_size=7, sampling_ratio=2),
        mask_roi_pool=MultiScaleRoIAlign(["0", "1"], output_size=14, sampling_ratio=2),
        **detector_kwargs)
