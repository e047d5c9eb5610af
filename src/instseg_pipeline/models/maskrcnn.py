"""The Mask R-CNN families (torchvision's detector), built without downloading anything.

The builders assemble the same architectures as torchvision's ``maskrcnn_resnet50_fpn``
(v1, v2) with backbone weights None; pretrained weights are loaded afterwards by
`instseg_pipeline.models.weights`. torchvision has no Mask R-CNN on MobileNetV3, so
``maskrcnn_mobilenet_v3_large_fpn`` is its Faster R-CNN MobileNetV3-FPN plus a mask head
(its COCO detection weights load into everything but the mask branch). ``maskrcnn_tiny``
(`instseg_pipeline.models.tiny`) is a family made with `mask_rcnn_family` too.

``training.model`` keys of every Mask R-CNN family, besides name and weights::

    trainable_backbone_layers: 3        # default 3 with weights, every stage without
    frozen_batchnorm: true              # default: with weights, except the v2 recipe
    frozen_bn_eps: 0.0                  # default 0.0 for the original COCO_V1 weights
    min_size: 800                       # and any key of DETECTOR_KEYS (MaskRCNN arguments)

Training targets may carry ``mask_weights`` (`contract.mask_weights`): the ROI heads
(`WeightedMaskRoIHeads`) then weight each positive ROI's mask loss by the weight of the
ground-truth instance it matched (`weighted_mask_loss`); the box and RPN losses are not
weighted (a pseudo-mask's box is as good as an annotated one's).

ONNX: the TorchScript exporter, one image per run, under `eager_exact_resize`.
"""
from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import mobilenet_v3_large, resnet50
from torchvision.models.detection import MaskRCNN, MaskRCNN_ResNet50_FPN_Weights
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import _mobilenet_extractor, _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, _default_anchorgen
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.models.detection.roi_heads import RoIHeads, project_masks_on_boxes
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.misc import FrozenBatchNorm2d

from instseg_pipeline.models.contract import ModelFamily, OnnxSpec, batch_mask_weights
from instseg_pipeline.models.weights import torchvision_weights

LOSS_NAMES = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness",
              "loss_rpn_box_reg")
DETECTOR_KEYS = (
    "min_size", "max_size", "image_mean", "image_std",
    "rpn_pre_nms_top_n_train", "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_train",
    "rpn_post_nms_top_n_test", "rpn_nms_thresh", "rpn_fg_iou_thresh", "rpn_bg_iou_thresh",
    "rpn_batch_size_per_image", "rpn_positive_fraction", "rpn_score_thresh",
    "box_score_thresh", "box_nms_thresh", "box_detections_per_img", "box_fg_iou_thresh",
    "box_bg_iou_thresh", "box_batch_size_per_image", "box_positive_fraction",
    "bbox_reg_weights",
)
ALIASES = {"roi_batch_size_per_image": "box_batch_size_per_image"}
BACKBONE_KEYS = ("trainable_backbone_layers", "frozen_batchnorm", "frozen_bn_eps")
PARAMETER_KEYS = (*BACKBONE_KEYS, *DETECTOR_KEYS, *ALIASES)
SECTION = "maskrcnn"  # training.families.maskrcnn

Construct = Callable[[int, dict, dict], MaskRCNN]


# --- parameters ------------------------------------------------------------------------------

def detector_kwargs(params: Mapping) -> dict:
    """MaskRCNN keyword arguments from ``params`` (aliases resolved, lists as tuples)."""
    doubled = [k for k in ALIASES if k in params and ALIASES[k] in params]
    if doubled:
        raise ValueError(f"model parameters give both {doubled[0]} and its name "
                         f"{ALIASES[doubled[0]]}; keep one")
    kwargs = {ALIASES.get(k, k): v for k, v in params.items()
              if k in DETECTOR_KEYS or k in ALIASES}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def _eps_for(name: str, weights) -> float | None:
    """torchvision's original COCO weights were trained with FrozenBatchNorm eps 0."""
    if weights is None:
        return None
    member = torchvision_weights(name, str(weights))
    return 0.0 if member == MaskRCNN_ResNet50_FPN_Weights.COCO_V1 else None


def _plain(value):
    """JSON-friendly copy: tuples become lists."""
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class MaskRCNNVariant:
    """One Mask R-CNN family: its constructor and its backbone defaults.

    ``max_trainable_layers``: how many backbone stages exist (all trainable when training
    from scratch); None for a backbone without pretrained stages to freeze.
    ``freeze_pretrained_bn``: whether pretrained weights mean FrozenBatchNorm by default.
    """

    name: str
    construct: Construct
    max_trainable_layers: int | None = None
    freeze_pretrained_bn: bool = True

    def backbone_spec(self, params: Mapping) -> dict:
        """trainable_backbone_layers, frozen_batchnorm and frozen_bn_eps, defaults resolved."""
        weights = params.get("weights")
        pretrained = weights is not None
        full = self.max_trainable_layers
        layers = params.get("trainable_backbone_layers", None if full is None else
                            min(3, full) if pretrained else full)
        return {
            "trainable_backbone_layers": None if layers is None else int(layers),
            "frozen_batchnorm": bool(params.get(
                "frozen_batchnorm", pretrained and self.freeze_pretrained_bn)),
            "frozen_bn_eps": params.get("frozen_bn_eps", _eps_for(self.name, weights)),
        }

    def settings(self, params: Mapping) -> dict:
        """What `model_config` saves: the backbone spec and the detector arguments."""
        kwargs = {k: _plain(v) for k, v in detector_kwargs(params).items()}
        return {**self.backbone_spec(params), **kwargs}

    def build(self, params: Mapping, num_classes: int) -> MaskRCNN:
        """The architecture for ``num_classes`` (background included); no weights loaded."""
        spec = self.backbone_spec(params)
        model = self.construct(num_classes, spec, detector_kwargs(params))
        weighted_mask_heads(model)
        if spec["frozen_bn_eps"] is not None:
            for module in model.modules():
                if isinstance(module, FrozenBatchNorm2d):
                    module.eps = float(spec["frozen_bn_eps"])
        return model


# --- the mask loss with per-instance weights --------------------------------------------------

def weighted_mask_loss(mask_logits: torch.Tensor, proposals: list[torch.Tensor],
                       gt_masks: list[torch.Tensor], gt_labels: list[torch.Tensor],
                       matched_idxs: list[torch.Tensor],
                       weights: list[torch.Tensor]) -> torch.Tensor:
    """torchvision's Mask R-CNN mask loss with a weight per positive ROI.

    ``mask_logits`` float [R, C, M, M] of the positive ROIs ``proposals`` (per image
    [R_i, 4]), matched to the ground-truth instances ``matched_idxs`` (per image int64
    [R_i]) of ``gt_masks`` / ``gt_labels``; ``weights`` per image float [K_i]. Each ROI's
    binary cross-entropy (its class's M x M mask against the ground truth cropped to the
    ROI, averaged over the pixels) is multiplied by its instance's weight; the sum is
    divided by R, as torchvision averages. Weights 1: torchvision's `maskrcnn_loss` (equal
    up to float rounding). Returns a scalar.
    """
    size = mask_logits.shape[-1]
    labels = torch.cat([gt[i] for gt, i in zip(gt_labels, matched_idxs)])
    roi_weights = torch.cat([w[i] for w, i in zip(weights, matched_idxs)])
    targets = torch.cat([project_masks_on_boxes(m, p, i, size)
                         for m, p, i in zip(gt_masks, proposals, matched_idxs)])
    if targets.numel() == 0:
        return mask_logits.sum() * 0
    logits = mask_logits[torch.arange(labels.shape[0], device=labels.device), labels]
    per_roi = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean((1, 2))
    return (per_roi * roi_weights.to(per_roi.dtype)).sum() / labels.shape[0]


class WeightedMaskRoIHeads(RoIHeads):
    """torchvision's `RoIHeads` whose training mask loss honours the targets'
    ``mask_weights`` (`weighted_mask_loss`).

    Without weights (or all 1) it is torchvision's forward, unchanged. With weights the
    forward runs as usual while the sampled ROIs and the mask logits are captured, and
    ``loss_mask`` is recomputed from them with the weights; every other output is
    torchvision's. No state of its own: the state dict is RoIHeads'.
    """

    _capture: dict | None = None

    def select_training_samples(self, proposals, targets):
        sampled = super().select_training_samples(proposals, targets)
        if self._capture is not None:
            self._capture["sampled"] = sampled
        return sampled

    def forward(self, features, proposals, image_shapes, targets=None):
        weights = (batch_mask_weights(targets)
                   if self.training and targets is not None and self.has_mask() else None)
        if weights is None:
            return super().forward(features, proposals, image_shapes, targets)
        self._capture = capture = {}
        hook = self.mask_predictor.register_forward_hook(
            lambda _module, _inputs, output: capture.__setitem__("logits", output))
        try:
            result, losses = super().forward(features, proposals, image_shapes, targets)
        finally:
            hook.remove()
            self._capture = None
        sampled, matched, labels, _ = capture["sampled"]
        positive = [torch.where(image_labels > 0)[0] for image_labels in labels]
        losses["loss_mask"] = weighted_mask_loss(
            capture["logits"], [p[i] for p, i in zip(sampled, positive)],
            [t["masks"] for t in targets], [t["labels"] for t in targets],
            [m[i] for m, i in zip(matched, positive)], weights)
        return result, losses


def weighted_mask_heads(model: nn.Module) -> nn.Module:
    """``model`` (a torchvision Mask R-CNN) with `WeightedMaskRoIHeads` as its ROI heads
    (same modules and weights; only the loss code differs)."""
    if type(model.roi_heads) is RoIHeads:
        model.roi_heads.__class__ = WeightedMaskRoIHeads
    return model


# --- architectures ---------------------------------------------------------------------------
# ``spec`` keys used here: frozen_batchnorm (bool), trainable_backbone_layers (int).

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


# --- ONNX tracing ----------------------------------------------------------------------------

def _resize_like_eager(transform, image, target=None):
    """Eval-time `GeneralizedRCNNTransform.resize`, traceable to the same output size.

    Eager: ``int(side * min(min_size / short, max_size / long))`` in float64. True division
    (not reciprocal-and-multiply, which is what ``python_float / tensor`` traces to) keeps
    every rounding step identical to Python's.
    """
    from torch.onnx import operators

    shape = operators.shape_as_tensor(image)[-2:].to(torch.float64)
    limits = torch.tensor([float(transform.min_size[-1]), float(transform.max_size)],
                          dtype=torch.float64)
    scale = torch.min(torch.div(limits, torch.stack([shape.min(), shape.max()])))
    size = torch.floor(shape * scale).to(torch.int64)
    size = [size[0], size[1]] if torch.jit.is_tracing() else size.tolist()
    resized = torch.nn.functional.interpolate(image[None], size=size, mode="bilinear",
                                              align_corners=False)[0]
    return resized, target


@contextmanager
def eager_exact_resize(network: MaskRCNN):
    """Within the block, ``network.transform`` resizes with `_resize_like_eager`.

    Why: with a tracer torchvision computes the resized size in float32 where eager
    computes ``int(side * scale)`` in float64; for about one image size in five they differ
    by a pixel (640x586: eager 244x224, the graph 244x223) and every output drifts. Eager
    results are unchanged (same size, same interpolation); only what a tracer records
    differs. A fixed-size transform has no size arithmetic and is left alone.
    """
    transform = network.transform
    if transform.fixed_size is not None:
        yield network
        return
    # an instance attribute shadows the class's method; deleting it restores the method
    transform.resize = types.MethodType(_resize_like_eager, transform)
    try:
        yield network
    finally:
        del transform.resize


def postprocess_cuts(network: MaskRCNN) -> dict:
    """The score threshold and detection cap the ROI heads apply to the eval output."""
    return {"score_threshold": float(network.roi_heads.score_thresh),
            "detections_per_img": int(network.roi_heads.detections_per_img)}


ONNX = OnnxSpec(
    exportable=True, tracing=eager_exact_resize, exporter="torchscript",
    note="TorchScript exporter (the dynamo exporter fails inside batched_nms); one image per "
         "run, since the traced list length is fixed; eager_exact_resize keeps the traced "
         "resize size equal to eager's; trace on an image with detections, or the graph "
         "holds only the empty path")


def mask_rcnn_family(name: str, construct: Construct, max_trainable_layers: int | None = None,
                     freeze_pretrained_bn: bool = True) -> ModelFamily:
    """The registry entry of a Mask R-CNN variant built by ``construct``."""
    variant = MaskRCNNVariant(name, construct, max_trainable_layers, freeze_pretrained_bn)
    return ModelFamily(name=name, build=variant.build, keys=PARAMETER_KEYS,
                       loss_names=LOSS_NAMES, onnx=ONNX, postprocess_cuts=postprocess_cuts,
                       resolve=variant.settings, section=SECTION)


RESNET50_FPN = mask_rcnn_family("maskrcnn_resnet50_fpn", build_resnet50_fpn, 5)
# the v2 recipe trains its pretrained BatchNorm layers
RESNET50_FPN_V2 = mask_rcnn_family("maskrcnn_resnet50_fpn_v2", build_resnet50_fpn_v2, 5,
                                   freeze_pretrained_bn=False)
MOBILENET_V3_LARGE_FPN = mask_rcnn_family("maskrcnn_mobilenet_v3_large_fpn",
                                          build_mobilenet_v3_large_fpn, 6)
