"""YOLACT++ (Bolya et al., "YOLACT++: Better Real-time Instance Segmentation", 2019, on
YOLACT, ICCV 2019): a one-stage detector whose masks are linear combinations of k
image-wide prototypes, natively in torch + torchvision ops.

Sizes (`FAMILIES`): ``yolact_plus_resnet50_fpn``, ``yolact_plus_resnet101_fpn`` (the
paper's backbones, 256-channel FPN, 32 prototypes) and ``yolact_tiny`` (a from-scratch
GroupNorm backbone of 32-64-128-256 channels, a 64-channel FPN whose five levels sit at
strides 4-64 instead of 8-128 for small images, 16 prototypes at stride 2: trains on CPU).

The network, as the papers describe it:
- backbone: ResNet with a modulated deformable 3x3 conv (DCNv2, `DeformConv2d`) in every
  ``dcn_interval``-th block of C3-C5 (YOLACT++'s "interval 3"); FPN P3-P5 plus P6, P7 by
  stride-2 convs on P5;
- one prediction head shared by P3-P7: a 3x3 conv, then per anchor class scores (softmax,
  background included), 4 box offsets (SSD coding, variances 0.1 / 0.2) and k mask
  coefficients (tanh); anchors of ``len(anchor_scale_multipliers) * len(aspect_ratios)``
  shapes per cell (YOLACT++: 3 scales x 3 ratios);
- protonet on P3 (three 3x3 convs, x2 upsample, a 3x3 conv, a 1x1 conv to k, ReLU);
  masks = sigmoid(prototypes @ coefficients), cropped to the box;
- Fast NMS (per class, upper-triangular IoU matrix), then YOLACT++'s fast mask re-scoring:
  a small conv net predicts each cropped mask's IoU per class, and the class score is
  multiplied by the IoU of the detected class.
Training: IoU >= 0.5 positive, < 0.4 negative (neutral between), each box also claims its
best anchor; OHEM 3:1 softmax loss (x1), smooth-L1 box loss (x1.5), mask BCE inside the
ground-truth box divided by its area (x6.125; the target of a prototype cell is the fraction
of it the object covers), semantic segmentation BCE on P3 (x1, a 1x1
conv used in training only), mask-IoU smooth-L1 (x25, the authors' setting; the mask fed to
the re-scoring net is detached). Box, class, mask and mask-IoU losses are divided by the
number of positives, the semantic loss by the batch size and the P3 area. A target's
``mask_weights`` (`contract.mask_weights`) multiply each trained positive's mask and
mask-IoU terms by the weight of the instance it matched (the normaliser stays the number of
positives); the box, class and semantic losses are not weighted.

Differences from the papers (settings in ``training.families.yolact``): the input is resized
like every family here (shorter side ``min_size``, longer side at most ``max_size``, padded
to a multiple of 32) instead of YOLACT's fixed 550x550 square; anchor scales are given for
the paper's 550 px input and scaled by ``min_size / 550`` so small inputs get proportionate
anchors; the ResNet uses trainable BatchNorm since nothing is pretrained here (the paper
freezes ImageNet BatchNorm statistics).

ONNX: the TorchScript exporter at opset >= 19 (ONNX DeformConv), see `onnx_tracing`.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import clip_boxes_to_image

from instseg_pipeline.models.contract import ModelFamily, OnnxSpec, mask_weights
from instseg_pipeline.models.maskrcnn import eager_exact_resize
from instseg_pipeline.models.yolact_backbones import TinyFPN, resnet_fpn
from instseg_pipeline.models.yolact_parts import (
    anchor_shapes,
    assemble_masks,
    class_loss_ohem,
    crop_masks,
    decode_boxes,
    encode_boxes,
    fast_nms,
    level_anchors,
    mask_iou,
    mask_loss,
    match_anchors,
    resize_masks,
    semantic_targets,
    sort_best_first,
)

logger = logging.getLogger(__name__)

SECTION = "yolact"  # training.families.yolact
LOSS_NAMES = ("loss_class", "loss_box", "loss_mask", "loss_semantic", "loss_maskiou")
# the papers' settings; the block training.families.yolact repeats them (a test checks)
DEFAULTS = {
    "num_prototypes": None,            # null: the size's own (32; tiny 16)
    "fpn_channels": None,              # null: the size's own (256; tiny 64)
    "dcn_interval": 3,
    "anchor_scales": [24, 48, 96, 192, 384],
    "anchor_scale_multipliers": [1.0, 2 ** (1 / 3), 2 ** (2 / 3)],
    "aspect_ratios": [1.0, 0.5, 2.0],
    "box_variances": [0.1, 0.2],
    "positive_iou": 0.5,
    "negative_iou": 0.4,
    "negative_ratio": 3,
    "masks_to_train": 100,
    "class_weight": 1.0,
    "box_weight": 1.5,
    "mask_weight": 6.125,
    "semantic_weight": 1.0,
    "maskiou_weight": 25.0,
    "score_threshold": 0.05,
    "nms_iou": 0.5,
    "nms_top_k": 200,
    "detections_per_img": 100,
}
# the paper's square input; anchor scales are given for it
PAPER_INPUT = 550
INPUT_KEYS = ("min_size", "max_size")
SIZES = {
    "yolact_plus_resnet50_fpn": {"backbone": "resnet50", "fpn_channels": 256,
                                 "num_prototypes": 32},
    "yolact_plus_resnet101_fpn": {"backbone": "resnet101", "fpn_channels": 256,
                                  "num_prototypes": 32},
    "yolact_tiny": {"backbone": "tiny", "fpn_channels": 64, "num_prototypes": 16},
}
MASKIOU_CHANNELS = (8, 16, 32, 64, 128)
IMAGE_MEAN = [0.485, 0.456, 0.406]
IMAGE_STD = [0.229, 0.224, 0.225]


# --- heads -----------------------------------------------------------------------------------

class PredictionHead(nn.Module):
    """Shared over P3-P7: a 3x3 conv + ReLU, then 3x3 convs to per-anchor class logits,
    box offsets and tanh mask coefficients."""

    def __init__(self, channels: int, anchors: int, classes: int, prototypes: int):
        super().__init__()
        self.shared = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1),
                                    nn.ReLU(inplace=True))
        self.classes = nn.Conv2d(channels, anchors * classes, 3, padding=1)
        self.boxes = nn.Conv2d(channels, anchors * 4, 3, padding=1)
        self.coefficients = nn.Conv2d(channels, anchors * prototypes, 3, padding=1)
        self.sizes = (classes, 4, prototypes)

    @staticmethod
    def _per_anchor(x: Tensor, size: int) -> Tensor:
        """[B, A*size, H, W] -> [B, H*W*A, size] ordered (y, x, anchor)."""
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, size)

    def forward(self, feature: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``feature`` [B, C, H, W] -> class logits [B, HWA, classes], box offsets
        [B, HWA, 4], coefficients [B, HWA, k] in (-1, 1)."""
        x = self.shared(feature)
        logits, boxes, coefficients = (
            self._per_anchor(conv(x), size)
            for conv, size in zip((self.classes, self.boxes, self.coefficients), self.sizes))
        return logits, boxes, torch.tanh(coefficients)


def _conv_relu(channels: int) -> nn.Sequential:
    """3x3 conv (same width, same size) + ReLU."""
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True))


class Protonet(nn.Module):
    """P3 [B, C, H, W] -> k non-negative prototypes [B, k, 2H, 2W]."""

    def __init__(self, channels: int, prototypes: int):
        super().__init__()
        self.before = nn.Sequential(*(_conv_relu(channels) for _ in range(3)))
        self.after = nn.Sequential(_conv_relu(channels), nn.Conv2d(channels, prototypes, 1),
                                   nn.ReLU(inplace=True))

    def forward(self, p3: Tensor) -> Tensor:
        x = F.interpolate(self.before(p3), scale_factor=2.0, mode="bilinear",
                          align_corners=False)
        return self.after(x)


class MaskIoUNet(nn.Module):
    """YOLACT++'s fast mask re-scoring: cropped mask probabilities [N, 1, h, w] -> the
    predicted mask IoU per foreground class [N, classes] (stride-2 convs, global max)."""

    def __init__(self, classes: int):
        super().__init__()
        layers, previous = [], 1
        for width in MASKIOU_CHANNELS:
            layers += [nn.Conv2d(previous, width, 3, 2, 1), nn.ReLU(inplace=True)]
            previous = width
        self.convs = nn.Sequential(*layers, nn.Conv2d(previous, classes, 1))
        # a neutral prior IoU: an untrained re-scorer halves the class scores instead of
        # zeroing them (and with them every detection)
        nn.init.constant_(self.convs[-1].bias, 0.5)

    def forward(self, masks: Tensor) -> Tensor:
        return self.convs(masks).amax(dim=(2, 3))


# --- the network -----------------------------------------------------------------------------

class Yolact(nn.Module):
    """YOLACT++ on any backbone returning five ``channels``-wide levels P3-P7.

    Train mode: ``(images, targets) -> {loss name: scalar}`` (`LOSS_NAMES`); eval mode:
    ``images -> [{"boxes", "labels", "scores", "masks"}]`` per the model contract.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, settings: Mapping):
        super().__init__()
        s = dict(settings)
        channels, prototypes = int(s["fpn_channels"]), int(s["num_prototypes"])
        self.settings = s
        self.num_classes = num_classes
        self.transform = GeneralizedRCNNTransform(int(s["min_size"]), int(s["max_size"]),
                                                  IMAGE_MEAN, IMAGE_STD, size_divisible=32)
        self.backbone = backbone
        # anchor scales are for the paper's 550 px input: scale them to ours
        factor = float(s["min_size"]) / PAPER_INPUT
        self.anchor_shapes = [anchor_shapes(scale * factor, s["anchor_scale_multipliers"],
                                            s["aspect_ratios"]) for scale in s["anchor_scales"]]
        per_cell = len(s["anchor_scale_multipliers"]) * len(s["aspect_ratios"])
        self.head = PredictionHead(channels, per_cell, num_classes, prototypes)
        self.protonet = Protonet(channels, prototypes)
        self.semantic = nn.Conv2d(channels, num_classes - 1, 1)
        self.maskiou = MaskIoUNet(num_classes - 1)
        self.score_threshold = float(s["score_threshold"])
        self.detections_per_img = int(s["detections_per_img"])

    def forward(self, images: list[Tensor], targets: list[dict] | None = None):
        if self.training and targets is None:
            raise ValueError("Yolact in train mode needs targets")
        original_sizes = [(img.shape[-2], img.shape[-1]) for img in images]
        batch, targets = self.transform(images, targets)
        padded = (batch.tensors.shape[-2], batch.tensors.shape[-1])
        features = list(self.backbone(batch.tensors).values())
        if len(features) != len(self.anchor_shapes):
            raise ValueError(f"yolact: the backbone returns {len(features)} levels, "
                             f"anchor_scales has {len(self.anchor_shapes)}")
        logits, offsets, coefficients, anchors = self._predict(features, padded)
        prototypes = self.protonet(features[0]).permute(0, 2, 3, 1)  # [B, h, w, k]
        if self.training:
            semantic = self.semantic(features[0])
            return self._losses(logits, offsets, coefficients, anchors, prototypes, semantic,
                                targets, batch.image_sizes, padded)
        return [self._detect(logits[i], offsets[i], coefficients[i], anchors, prototypes[i],
                             batch.image_sizes[i], original_sizes[i], padded)
                for i in range(len(images))]

    def _predict(self, features: list[Tensor], padded) -> tuple[Tensor, ...]:
        """Head outputs of every level, concatenated: logits [B, A, C], offsets [B, A, 4],
        coefficients [B, A, k], and the anchors [A, 4] in padded-batch pixels."""
        outputs = [self.head(feature) for feature in features]
        anchors = torch.cat([level_anchors(shapes, feature, padded)
                             for shapes, feature in zip(self.anchor_shapes, features)])
        return (*(torch.cat(parts, dim=1) for parts in zip(*outputs)), anchors)

    # --- inference ---------------------------------------------------------------------------

    def _detect(self, logits: Tensor, offsets: Tensor, coefficients: Tensor, anchors: Tensor,
                prototypes: Tensor, resized, original, padded) -> dict:
        """One image's detections at its input size (see the class docstring)."""
        s = self.settings
        scores = F.softmax(logits, dim=-1)[:, 1:]
        boxes = clip_boxes_to_image(decode_boxes(offsets, anchors, s["box_variances"]),
                                    resized)
        # anchors no class wants cannot survive; sorting them per class is wasted work
        candidate = scores.max(dim=1).values > self.score_threshold
        boxes, scores, labels, index = fast_nms(
            boxes[candidate], scores[candidate], float(s["nms_iou"]), self.score_threshold,
            int(s["nms_top_k"]), self.detections_per_img)
        stride = boxes.new_tensor([padded[1] / prototypes.shape[1],
                                   padded[0] / prototypes.shape[0]]).repeat(2)
        masks = crop_masks(torch.sigmoid(assemble_masks(prototypes,
                                                        coefficients[candidate][index])),
                           boxes / stride)
        scores = scores * self._predicted_iou(masks, labels)
        order = sort_best_first(scores)[1]
        order = order[scores[order] > self.score_threshold]
        boxes = resize_boxes(boxes[order], resized, original)
        return {"boxes": boxes, "labels": labels[order], "scores": scores[order],
                "masks": self._paste(masks[order], boxes, resized, original, padded)[:, None]}

    def _predicted_iou(self, masks: Tensor, labels: Tensor) -> Tensor:
        """float [N] in [0, 1]: the re-scoring net's IoU for each mask's own class."""
        predicted = self.maskiou(masks[:, None])
        return predicted.gather(1, (labels - 1)[:, None])[:, 0].clamp(0.0, 1.0)

    @staticmethod
    def _paste(masks: Tensor, boxes: Tensor, resized, original, padded) -> Tensor:
        """Prototype-resolution masks [N, h, w] -> probabilities [N, H, W] at the input
        size: up to the padded batch, padding cut away, resized to the input, then cropped
        to the (input-size) boxes again so nothing leaks out of a box."""
        full = resize_masks(masks, padded)[:, :resized[0], :resized[1]]
        return crop_masks(resize_masks(full, original), boxes).clamp(0.0, 1.0)

    # --- training ----------------------------------------------------------------------------

    def _losses(self, logits, offsets, coefficients, anchors, prototypes, semantic, targets,
                image_sizes, padded) -> dict[str, Tensor]:
        """The weighted losses of a batch (see the module docstring for the normalisation)."""
        s = self.settings
        sums = {name: logits.new_zeros(()) for name in LOSS_NAMES}
        positives = 0
        for i, target in enumerate(targets):
            parts, count = self._image_losses(logits[i], offsets[i], coefficients[i], anchors,
                                              prototypes[i], semantic[i], target, padded)
            positives += count
            for name, value in parts.items():
                sums[name] = sums[name] + value
        per_positive = max(positives, 1)
        area = semantic.shape[-2] * semantic.shape[-1]
        return {"loss_class": sums["loss_class"] * s["class_weight"] / per_positive,
                "loss_box": sums["loss_box"] * s["box_weight"] / per_positive,
                "loss_mask": sums["loss_mask"] * s["mask_weight"] / per_positive,
                "loss_semantic": sums["loss_semantic"] * s["semantic_weight"]
                / (len(targets) * area),
                "loss_maskiou": sums["loss_maskiou"] * s["maskiou_weight"] / per_positive}

    def _image_losses(self, logits, offsets, coefficients, anchors, prototypes, semantic,
                      target, padded) -> tuple[dict[str, Tensor], int]:
        """Unnormalised loss sums of one image and its number of positive anchors."""
        s = self.settings
        gt_boxes, gt_labels = target["boxes"], target["labels"]
        labels, matched = match_anchors(anchors, gt_boxes, gt_labels, float(s["positive_iou"]),
                                        float(s["negative_iou"]))
        positive = torch.nonzero(labels > 0)[:, 0]
        masks = self._padded_masks(target, padded, gt_boxes.dtype)
        box_targets = encode_boxes(gt_boxes[matched[positive]], anchors[positive],
                                   s["box_variances"])
        parts = {
            "loss_class": class_loss_ohem(logits, labels, int(s["negative_ratio"])),
            "loss_box": F.smooth_l1_loss(offsets[positive], box_targets, reduction="sum"),
            "loss_semantic": F.binary_cross_entropy_with_logits(
                semantic, semantic_targets(masks, gt_labels, self.num_classes - 1,
                                           semantic.shape[-2:]), reduction="sum"),
        }
        trained = positive[torch.randperm(len(positive), device=positive.device)
                           [:int(s["masks_to_train"])]]
        parts.update(self._mask_losses(coefficients[trained], prototypes, masks,
                                       gt_boxes, gt_labels, matched[trained], padded,
                                       mask_weights(target)))
        return parts, len(positive)

    @staticmethod
    def _padded_masks(target: dict, padded, dtype) -> Tensor:
        """The target's masks float [K, Hp, Wp]: the resized masks padded like the batch."""
        masks = target["masks"].to(dtype)
        return F.pad(masks, (0, padded[1] - masks.shape[-1], 0, padded[0] - masks.shape[-2]))

    def _mask_losses(self, coefficients, prototypes, masks, gt_boxes, gt_labels, matched,
                     padded, weights: Tensor | None = None) -> dict[str, Tensor]:
        """Mask BCE and mask-IoU loss sums over the trained positives (coefficients
        [P, k], ``matched`` their ground-truth indices); ``weights`` float [K] (optional,
        per ground-truth instance) multiply each positive's terms."""
        size = prototypes.shape[:2]
        stride = gt_boxes.new_tensor([padded[1] / size[1], padded[0] / size[0]]).repeat(2)
        boxes = gt_boxes[matched] / stride
        # soft targets: a prototype cell half inside the object is worth 0.5, so the
        # learned outline sits where the object's is instead of half a cell inside it
        targets = resize_masks(masks, size)[matched]
        logits = assemble_masks(prototypes, coefficients)
        predicted = crop_masks(torch.sigmoid(logits.detach()), boxes)
        iou_targets = mask_iou(predicted > 0.5, targets > 0.5)
        iou = self.maskiou(predicted[:, None]).gather(1, (gt_labels[matched] - 1)[:, None])
        if weights is None:
            return {"loss_mask": mask_loss(logits, targets, boxes),
                    "loss_maskiou": F.smooth_l1_loss(iou[:, 0], iou_targets, reduction="sum")}
        per_positive = weights.to(logits.device, logits.dtype)[matched]
        return {"loss_mask": mask_loss(logits, targets, boxes, per_positive),
                "loss_maskiou": (F.smooth_l1_loss(iou[:, 0], iou_targets, reduction="none")
                                 * per_positive).sum()}


# --- the family ------------------------------------------------------------------------------

def _plain(value):
    return list(value) if isinstance(value, tuple | list) else value


def settings_of(name: str, params: Mapping) -> dict:
    """Every setting of size ``name`` with ``params`` on top: the papers' defaults, the
    size's widths, the paper's 550 px input; JSON-friendly (lists, no nulls)."""
    size = SIZES[name]
    given = {k: v for k, v in params.items() if k not in ("name", "weights") and v is not None}
    merged = {**DEFAULTS, "min_size": PAPER_INPUT, "max_size": PAPER_INPUT,
              "fpn_channels": size["fpn_channels"], "num_prototypes": size["num_prototypes"],
              **given}
    return {k: _plain(v) for k, v in merged.items()}


def _check(name: str, s: Mapping) -> None:
    """Refuse settings that cannot build a network, naming the key."""
    if not 0.0 <= s["negative_iou"] <= s["positive_iou"] <= 1.0:
        raise ValueError(f"{name}: need 0 <= negative_iou <= positive_iou <= 1, got "
                         f"{s['negative_iou']} and {s['positive_iou']}")
    if len(s["anchor_scales"]) != 5:
        raise ValueError(f"{name}: anchor_scales needs one scale per level P3-P7 (5), got "
                         f"{s['anchor_scales']}")
    if int(s["dcn_interval"]) < 0:
        raise ValueError(f"{name}: dcn_interval must be >= 0 (0: no deformable convs)")


def build(name: str, params: Mapping, num_classes: int) -> Yolact:
    """The ``name`` size for ``num_classes`` classes (background included)."""
    s = settings_of(name, params)
    _check(name, s)
    kind, channels = SIZES[name]["backbone"], int(s["fpn_channels"])
    backbone = (TinyFPN(channels, int(s["dcn_interval"])) if kind == "tiny"
                else resnet_fpn(kind, channels, int(s["dcn_interval"])))
    logger.debug("%s: %d classes, %d prototypes, %d-channel FPN", name, num_classes,
                 s["num_prototypes"], channels)
    return Yolact(backbone, num_classes, s)


def postprocess_cuts(network: Yolact) -> dict:
    """The score threshold and detection cap the network applies to its eval output."""
    return {"score_threshold": network.score_threshold,
            "detections_per_img": network.detections_per_img}


DEFORM_CONV_OPSET = 19


def _deform_conv_symbolic(g, inp, weight, offset, mask, bias, stride_h, stride_w, pad_h,
                          pad_w, dilation_h, dilation_w, groups, offset_groups, use_mask):
    """``torchvision::deform_conv2d`` as ONNX DeformConv (opset 19; torchvision registers
    no symbolic for it)."""
    from torch.onnx import symbolic_helper

    if g.opset < DEFORM_CONV_OPSET:
        raise RuntimeError(f"YOLACT++'s deformable convs need ONNX opset >= "
                           f"{DEFORM_CONV_OPSET} (DeformConv), export asked for {g.opset}")
    ints = [symbolic_helper._get_const(v, "i", name) for v, name in (
        (stride_h, "stride_h"), (stride_w, "stride_w"), (pad_h, "pad_h"), (pad_w, "pad_w"),
        (dilation_h, "dilation_h"), (dilation_w, "dilation_w"), (groups, "groups"),
        (offset_groups, "offset_groups"))]
    sh, sw, ph, pw, dh, dw, grp, ogrp = ints
    kernel = symbolic_helper._get_tensor_sizes(weight)[2:]
    inputs = [inp, weight, offset, bias]
    if symbolic_helper._get_const(use_mask, "b", "use_mask"):
        inputs.append(mask)
    return g.op("DeformConv", *inputs, dilations_i=[dh, dw], group_i=grp,
                offset_group_i=ogrp, kernel_shape_i=kernel, pads_i=[ph, pw, ph, pw],
                strides_i=[sh, sw])


@contextmanager
def onnx_tracing(network: Yolact):
    """The ONNX tracing hook: ``torchvision::deform_conv2d`` exports as ONNX DeformConv
    (opset 19, run by onnxruntime's CPU kernel) and the resize is traced with eager's
    rounding (`maskrcnn.eager_exact_resize`). Eager results are unchanged."""
    torch.onnx.register_custom_op_symbolic("torchvision::deform_conv2d",
                                           _deform_conv_symbolic, 9)
    try:
        with eager_exact_resize(network):
            yield network
    finally:
        torch.onnx.unregister_custom_op_symbolic("torchvision::deform_conv2d", 9)


ONNX = OnnxSpec(
    exportable=True, tracing=onnx_tracing, exporter="torchscript", min_opset=DEFORM_CONV_OPSET,
    note=f"TorchScript exporter at opset >= {DEFORM_CONV_OPSET}: the deformable convs "
         "export as ONNX DeformConv (onnx_tracing registers the symbolic); one image per "
         "run; trace on an image with detections")
FAMILY_KEYS = (*DEFAULTS, *INPUT_KEYS)


def _entry(name: str) -> ModelFamily:
    return ModelFamily(
        name=name, build=lambda params, num_classes: build(name, params, num_classes),
        keys=FAMILY_KEYS, loss_names=LOSS_NAMES, onnx=ONNX, postprocess_cuts=postprocess_cuts,
        resolve=lambda params: settings_of(name, params), section=SECTION)


FAMILIES = tuple(_entry(name) for name in SIZES)
