"""Panoptic FPN (Kirillov et al., 2019): the project's Mask R-CNN plus a semantic FPN branch.

Sizes: ``panoptic_fpn_tiny`` (on ``maskrcnn_tiny``'s backbone and heads) and
``panoptic_fpn_resnet50`` (torchvision's ResNet-50-FPN Mask R-CNN, weights None). Both share
the FPN between the detector and the semantic branch (`SemanticFPNHead`) and train
jointly: the train-mode loss dict is Mask R-CNN's five losses plus ``loss_semantic``
(cross-entropy over the labels 0 = things, 1..S = stuff, 255 ignored, weighted by
``semantic_loss_weight``, the paper's lambda_s, 0.5 as in detectron2). The eval output adds
``semantic`` int64 [H, W] at the input size to the contract's instance outputs. A target's
``mask_weights`` weight the Mask R-CNN mask loss as in `maskrcnn.WeightedMaskRoIHeads`; the
semantic loss is not weighted (its thing pixels come from the masks, pseudo or not).

``training.model`` keys: every Mask R-CNN key (`models.maskrcnn`) plus::

    semantic_channels: null      # branch width; null: the size's (128, tiny 32)
    semantic_loss_weight: 0.5    # lambda_s, inside the family's losses
    stuff_classes: S             # set by training from the data's stuff categories

The network keeps Mask R-CNN's module names (``backbone``, ``rpn``, ``roi_heads``,
``transform``), so a Mask R-CNN checkpoint of the same backbone fits everything but
``semantic_head``, and Mask R-CNN's ONNX tracing (`maskrcnn.eager_exact_resize`) and
postprocessing cuts apply as they are.

The semantic branch: each of P2..P5 (strides 4..32) goes through as many upsampling stages
(3x3 conv + GroupNorm + ReLU + 2x bilinear upsample) as it takes to reach stride 4 (P2: one
conv, no upsample; P3: one stage; P4: two; P5: three); the four maps are summed, a 1x1 conv
gives S + 1 classes and a 4x bilinear upsample brings them to the padded input.
`semantic_targets` resizes and pads the targets' ``"semantic"`` maps the way the detector's
transform resized and padded the images.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

from instseg_pipeline.data.tables import IGNORE_LABEL
from instseg_pipeline.models import maskrcnn, tiny
from instseg_pipeline.models.contract import ModelFamily, OnnxSpec
from instseg_pipeline.models.maskrcnn import MaskRCNNVariant

SECTION = "panoptic_fpn"  # training.families.panoptic_fpn
LOSS_NAMES = (*maskrcnn.LOSS_NAMES, "loss_semantic")
# the settings of every size (conf/base/parameters_training.yml mirrors them)
DEFAULTS = {"semantic_channels": None, "semantic_loss_weight": 0.5}
STUFF_KEY = "stuff_classes"
PARAMETER_KEYS = (*maskrcnn.PARAMETER_KEYS, *DEFAULTS, STUFF_KEY)
# the semantic branch: what a Mask R-CNN checkpoint lacks
SEMANTIC_PREFIX = "semantic_head."


# --- the semantic FPN branch -----------------------------------------------------------------

LEVELS = 4  # P2..P5


def norm_groups(channels: int) -> int:
    """GroupNorm groups for ``channels``: 32 as in the paper, fewer for narrow maps so
    each group keeps at least 4 channels."""
    return next(g for g in (32, 16, 8, 4, 2, 1)
                if (channels % g == 0 and channels // g >= 4) or g == 1)


def _conv_gn_relu(in_ch: int, out_ch: int) -> nn.Sequential:
    """3x3 conv + GroupNorm + ReLU."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
                         nn.GroupNorm(norm_groups(out_ch), out_ch), nn.ReLU(inplace=True))


class SemanticFPNHead(nn.Module):
    """``[P2, P3, P4, P5] float [B, C, H/s, W/s] -> logits float [B, S + 1, H, W]``.

    ``in_channels``: the FPN width C; ``channels``: the branch width (128 in the paper);
    ``num_classes``: S + 1. Each upsampling stage resizes to the next finer level's size
    (exactly 2x for inputs padded to a multiple of 32; the sizes keep odd inputs aligned).
    """

    def __init__(self, in_channels: int, channels: int, num_classes: int):
        super().__init__()
        self.levels = nn.ModuleList()
        for level in range(LEVELS):
            convs = [_conv_gn_relu(in_channels if i == 0 else channels, channels)
                     for i in range(max(level, 1))]
            self.levels.append(nn.ModuleList(convs))
        self.predictor = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.predictor.weight, std=0.01)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, features: list[torch.Tensor], size) -> torch.Tensor:
        """``features``: P2..P5 (finest first); ``size``: the padded input (H, W)."""
        sizes = [f.shape[-2:] for f in features]
        total = None
        for level, (x, convs) in enumerate(zip(features, self.levels)):
            for i, conv in enumerate(convs):
                x = conv(x)
                if level > 0:  # stage i of level L lands on level L - 1 - i
                    x = F.interpolate(x, size=sizes[level - 1 - i], mode="bilinear",
                                      align_corners=False)
            total = x if total is None else total + x
        logits = self.predictor(total)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def semantic_targets(targets: list[dict], image_sizes: list[tuple[int, int]],
                     padded: tuple[int, int], device) -> torch.Tensor:
    """int64 [B, H, W] labels for the padded batch: each target's ``"semantic"`` (int64
    [h0, w0] at the image's input size) resized with nearest to the size the transform
    resized its image to (``image_sizes``), then padded with `IGNORE_LABEL` to ``padded``.
    A target without ``"semantic"`` is all `IGNORE_LABEL` (no semantic loss from it)."""
    out = torch.full((len(targets), *padded), IGNORE_LABEL, dtype=torch.int64, device=device)
    for i, (target, (h, w)) in enumerate(zip(targets, image_sizes)):
        semantic = target.get("semantic")
        if semantic is None:
            continue
        resized = F.interpolate(semantic[None, None].float(), size=(int(h), int(w)),
                                mode="nearest")[0, 0]
        out[i, :h, :w] = resized.to(device=device, dtype=torch.int64)
    return out


def check_semantic_targets(images: list[torch.Tensor], targets: list[dict],
                           stuff_classes: int) -> None:
    """Raise ValueError naming the target whose ``"semantic"`` is not an integer [H, W] map
    of its image's size with labels 0..S or `IGNORE_LABEL`."""
    for i, (image, target) in enumerate(zip(images, targets)):
        semantic = target.get("semantic")
        if semantic is None:
            continue
        size = tuple(image.shape[-2:])
        if semantic.dtype.is_floating_point or tuple(semantic.shape) != size:
            raise ValueError(f"target {i}: 'semantic' must be an integer map of the image's "
                             f"size {list(size)}, got {semantic.dtype} {list(semantic.shape)}")
        bad = (semantic > stuff_classes) & (semantic != IGNORE_LABEL) | (semantic < 0)
        if bool(bad.any()):
            raise ValueError(f"target {i}: 'semantic' holds labels "
                             f"{sorted(set(semantic[bad].tolist()))[:5]} outside 0..S "
                             f"(S = {stuff_classes} stuff classes) and {IGNORE_LABEL} (void)")


def semantic_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the pixels not labelled `IGNORE_LABEL` (0 when there are none,
    where a plain mean would be 0 / 0)."""
    total = F.cross_entropy(logits, labels, ignore_index=IGNORE_LABEL, reduction="sum")
    valid = (labels != IGNORE_LABEL).sum()
    return total / valid.clamp(min=1).to(total.dtype)


def semantic_maps(logits: torch.Tensor, image_sizes, original_sizes) -> list[torch.Tensor]:
    """Per image int64 [h0, w0] labels: the logits of the padded batch cropped to the
    resized image, resized back to the input size, then argmax."""
    maps = []
    for i, ((h, w), original) in enumerate(zip(image_sizes, original_sizes)):
        cropped = logits[i:i + 1, :, :h, :w]
        resized = F.interpolate(cropped, size=original, mode="bilinear", align_corners=False)
        maps.append(resized[0].argmax(0))
    return maps


# --- sizes -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Size:
    """A size of the family: the Mask R-CNN it extends and its semantic branch width."""

    detector: MaskRCNNVariant
    semantic_channels: int


SIZES = {
    "panoptic_fpn_tiny": Size(MaskRCNNVariant("maskrcnn_tiny", tiny.build_tiny), 32),
    # the Mask R-CNN name: its torchvision weights decide the FrozenBatchNorm eps
    "panoptic_fpn_resnet50": Size(MaskRCNNVariant("maskrcnn_resnet50_fpn",
                                                  maskrcnn.build_resnet50_fpn, 5), 128),
}


class PanopticFPN(GeneralizedRCNN):
    """A torchvision Mask R-CNN whose FPN also feeds a `SemanticFPNHead`.

    Train: ``(images, targets) -> {5 Mask R-CNN losses, "loss_semantic"}``; targets may
    carry ``"semantic"`` int64 [H, W] at the image size (0 things, 1..S stuff, 255 void).
    Eval: ``images -> [{boxes, labels, scores, masks, semantic int64 [H, W]}]`` at the
    input size.
    """

    # a Mask R-CNN checkpoint has no semantic branch: `models.weights` leaves it fresh
    optional_state_prefixes = (SEMANTIC_PREFIX,)

    def __init__(self, detector: MaskRCNN, semantic_head: SemanticFPNHead,
                 stuff_classes: int, semantic_loss_weight: float):
        super().__init__(detector.backbone, detector.rpn, detector.roi_heads,
                         detector.transform)
        self.semantic_head = semantic_head
        self.stuff_classes = int(stuff_classes)
        self.semantic_loss_weight = float(semantic_loss_weight)

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None):
        if self.training:
            if targets is None:
                raise ValueError("PanopticFPN in train mode needs targets")
            check_semantic_targets(images, targets, self.stuff_classes)
        # kept as shape values (not ints): a tracer records them as dynamic sizes
        original_sizes = [(image.shape[-2], image.shape[-1]) for image in images]
        batch, targets = self.transform(images, targets)
        features = self.backbone(batch.tensors)
        proposals, proposal_losses = self.rpn(batch, features, targets)
        detections, detector_losses = self.roi_heads(features, proposals, batch.image_sizes,
                                                     targets)
        levels = list(features.values())[:len(self.semantic_head.levels)]
        logits = self.semantic_head(levels, batch.tensors.shape[-2:])
        if self.training:
            labels = semantic_targets(targets, batch.image_sizes,
                                      tuple(batch.tensors.shape[-2:]), logits.device)
            loss = self.semantic_loss_weight * semantic_loss(logits, labels)
            return {**detector_losses, **proposal_losses, "loss_semantic": loss}
        detections = self.transform.postprocess(detections, batch.image_sizes, original_sizes)
        maps = semantic_maps(logits, batch.image_sizes, original_sizes)
        return [{**detection, "semantic": semantic}
                for detection, semantic in zip(detections, maps)]


# --- parameters ------------------------------------------------------------------------------

def _stuff_classes(params: Mapping, name: str) -> int:
    value = params.get(STUFF_KEY)
    if value is None:
        raise ValueError(
            f"{name}: training.model.stuff_classes is missing; a Panoptic FPN model needs the "
            "number of stuff categories S (training sets it from the data's stuff categories; "
            "pass it in training.model to build one by hand)")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: training.model.stuff_classes: expected an integer >= 1 "
                         f"(the number of stuff categories), got {value!r}")
    return value


def semantic_settings(params: Mapping) -> dict:
    """The semantic branch's settings of size ``params["name"]``: defaults resolved,
    checked; errors name the dotted key."""
    name = params["name"]
    merged = {**DEFAULTS, "semantic_channels": SIZES[name].semantic_channels,
              **{k: v for k, v in params.items() if k in DEFAULTS and v is not None}}
    channels, weight = merged["semantic_channels"], merged["semantic_loss_weight"]
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"training.model.semantic_channels: expected an integer >= 1, got "
                         f"{channels!r}")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
        raise ValueError(f"training.model.semantic_loss_weight: expected a number >= 0, got "
                         f"{weight!r}")
    return {"semantic_channels": channels, "semantic_loss_weight": float(weight),
            STUFF_KEY: _stuff_classes(params, name)}


def build(params: Mapping, num_classes: int) -> PanopticFPN:
    """The network of size ``params["name"]`` for ``num_classes`` thing classes (background
    included) and ``params["stuff_classes"]`` stuff categories; no weights loaded."""
    size = SIZES[params["name"]]
    semantic = semantic_settings(params)
    detector = size.detector.build(params, num_classes)
    head = SemanticFPNHead(detector.backbone.out_channels, semantic["semantic_channels"],
                           semantic[STUFF_KEY] + 1)
    return PanopticFPN(detector, head, semantic[STUFF_KEY], semantic["semantic_loss_weight"])


def resolve(params: Mapping) -> dict:
    """What `model_config` saves: the Mask R-CNN settings, the semantic branch's and
    ``stuff_classes`` (so `load_model` rebuilds the same head)."""
    size = SIZES[params["name"]]
    return {**size.detector.settings(params), **semantic_settings(params)}


ONNX = OnnxSpec(
    exportable=True, tracing=maskrcnn.eager_exact_resize, exporter="torchscript",
    note="as Mask R-CNN (TorchScript exporter, one image per run, eager_exact_resize; trace "
         "on an image with detections), plus the semantic map as a fifth output")


def _family(name: str) -> ModelFamily:
    return ModelFamily(name=name, build=build, keys=PARAMETER_KEYS, loss_names=LOSS_NAMES,
                       onnx=ONNX, postprocess_cuts=maskrcnn.postprocess_cuts, resolve=resolve,
                       section=SECTION, semantic=True)


FAMILIES = tuple(_family(name) for name in SIZES)
