"""``simpleseg``: a simple bottom-up instance segmenter, the project's honest baseline.

Architecture (`SimpleInstanceSeg`): a backbone with an FPN (torchvision's ResNet-50/101-FPN,
or the tiny GroupNorm backbone of `instseg_pipeline.models.tiny`), its levels fused at
stride 4 (a 3x3 conv + GroupNorm + ReLU per level, upsampled and summed, as in the
semantic branch of Panoptic FPN), and three small heads on the fused map:

- semantic: per-pixel logits over background + classes;
- centre: a heatmap peaking at each instance's centre (its pixel deepest inside the mask,
  see `simpleseg_grouping.instance_centres`: Panoptic-DeepLab's centre of mass can fall
  outside a ring-shaped visible mask, onto the object in front of it);
- offset: per pixel, ``(dy, dx)`` to the centre of its instance.

The head outputs are upsampled to the resized input (stride 1), where losses and grouping
work, and corrected there by `Refine` (two 3x3 convs on the maps and the image,
``refine_channels`` wide; 0 turns it off): bilinearly upsampled stride-4 maps blur every
outline, which costs small objects a tenth of their mask IoU.

Grouping (`simpleseg_grouping.group_pixels`), the Panoptic-DeepLab recipe (Cheng et al.,
CVPR 2020) much simplified: centres are the peaks of the heatmap (max-pool NMS over
``nms_kernel`` px, heat above ``center_threshold``, at most ``top_k``); every pixel joins
the centre nearest to its own position plus its offset. A group's foreground pixels (P(not
background) >= 0.5) give its class (highest mean class probability) and its score (centre
heat x that mean probability); its mask is the foreground probability on the group's
pixels, so the contract's probability masks are real ones, and its box the tight box of
the mask at 0.5. Why not connected components of the class map: two touching objects of
one class form one component and would come out as one instance (the synthetic data holds
such touching pairs on purpose); a centre per object with offsets pointing to it separates
them. Cost: a [centres, pixels] distance matrix per image (100 centres on a 320x427 input:
0.5-1.5 s on one busy CPU thread; a trained model on a few objects has a few centres).

Losses (Panoptic-DeepLab's, scaled inside the family): ``loss_semantic`` cross-entropy
averaged over the hardest ``semantic_top_k`` (20 %) of pixels x ``semantic_weight`` (1),
``loss_center`` mean squared error to Gaussian centre heatmaps of ``center_sigma`` px x
``center_weight`` (200), ``loss_offset`` L1 (|dy| + |dx|) averaged over instance pixels x
``offset_weight`` (0.01; on images of about 128 px, whose offsets span a few pixels, 0.1
trains them better: the overfit test uses it). Crowd instances (``iscrowd`` in a target, when present) and the
batch padding are ignored by the semantic and centre losses and are no instance.
Panoptic-DeepLab's extra weight on small instances is left out: this is the baseline.
A target's ``mask_weights`` (`contract.mask_weights`, one per instance) weight the
per-pixel terms of each instance's pixels in the semantic and offset losses (the pixels its
mask owns; the normalisers stay the pixel counts, the hard-pixel share is taken of the
weighted losses); background pixels and the centre loss keep weight 1.

Sizes: ``simpleseg_resnet50_fpn``, ``simpleseg_resnet101_fpn`` (torchvision ResNets from
scratch, BatchNorm, 256-ch FPN, 128-ch heads, 32-ch refinement, 800/1333 px; 28.5 M and
47.5 M parameters with 81 classes) and ``simpleseg_tiny`` (the 32-64-128-256 GroupNorm
backbone with its 64-ch FPN, 64-ch heads, 16-ch refinement, 256/512 px; 1.6 M). Settings:
`DEFAULTS` (``training.families.simpleseg``), plus ``min_size`` and ``max_size``.

ONNX: the TorchScript exporter traces the whole forward, grouping included, one image per
run; the grouping avoids data-dependent Python branches (see `simpleseg_grouping`), and
`instseg_pipeline.models.maskrcnn.eager_exact_resize` keeps the traced resize equal to
eager's. The centre top-k is ``min(top_k, pixels)``, fixed at trace time; every input
resized to ``min_size`` has more pixels than ``top_k``.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet50, resnet101
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from instseg_pipeline.models.contract import ModelFamily, OnnxSpec, mask_weights
from instseg_pipeline.models.maskrcnn import eager_exact_resize
from instseg_pipeline.models.simpleseg_grouping import (
    IGNORE,
    build_targets,
    group_pixels,
    tight_boxes,
)
from instseg_pipeline.models.tiny import TinyBackbone

SECTION = "simpleseg"  # training.families.simpleseg
LOSS_NAMES = ("loss_semantic", "loss_center", "loss_offset")
# the settings of every size (conf/base/parameters_training.yml mirrors them)
DEFAULTS = {
    "head_channels": None,       # null: the size's own width (128 ResNet, 64 tiny)
    "refine_channels": None,     # null: the size's own (32 ResNet, 16 tiny); 0: no refinement
    "center_sigma": 8.0,         # px, Gaussian of the centre targets (Panoptic-DeepLab)
    "center_threshold": 0.1,     # a centre's heat must exceed it (Panoptic-DeepLab)
    "nms_kernel": 7,             # px, max-pool window of the centre NMS (Panoptic-DeepLab)
    "top_k": 100,                # at most this many centres, i.e. detections per image
    "score_threshold": 0.05,     # detections scoring less are dropped
    "semantic_top_k": 0.2,       # share of hardest pixels the semantic loss averages
    "semantic_weight": 1.0,      # loss weights of Panoptic-DeepLab
    "center_weight": 200.0,
    "offset_weight": 0.01,
}
SIZE_KEYS = ("min_size", "max_size")
PARAMETER_KEYS = (*DEFAULTS, *SIZE_KEYS)
IMAGE_MEAN = [0.485, 0.456, 0.406]
IMAGE_STD = [0.229, 0.224, 0.225]


# --- parameters ------------------------------------------------------------------------------

def _positive_int(key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"training.model.{key}: expected an integer >= 1, got {value!r}")
    return value


def _number(key: str, value, low: float, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low or (
            high is not None and value > high):
        span = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"training.model.{key}: expected a number {span}, got {value!r}")
    return float(value)


def _checked(settings: dict) -> dict:
    """``settings`` with types and ranges checked; errors name the dotted key."""
    out = dict(settings)
    for key in ("head_channels", "top_k", "min_size", "max_size"):
        out[key] = _positive_int(key, settings[key])
    refine = settings["refine_channels"]
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        raise ValueError(f"training.model.refine_channels: expected an integer >= 0, got "
                         f"{refine!r}")
    out["nms_kernel"] = _positive_int("nms_kernel", settings["nms_kernel"])
    if out["nms_kernel"] % 2 == 0:
        raise ValueError(f"training.model.nms_kernel: must be odd (a window centred on "
                         f"its pixel), got {out['nms_kernel']}")
    out["center_sigma"] = _number("center_sigma", settings["center_sigma"], 1e-3)
    out["semantic_top_k"] = _number("semantic_top_k", settings["semantic_top_k"], 1e-3, 1.0)
    for key in ("center_threshold", "score_threshold"):
        out[key] = _number(key, settings[key], 0.0, 1.0)
    for key in ("semantic_weight", "center_weight", "offset_weight"):
        out[key] = _number(key, settings[key], 0.0)
    return out


# --- sizes -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Size:
    """One size of the family: its backbone (an FPN returning an OrderedDict with
    ``out_channels``), the levels fused (the first at stride 4) and its default widths."""

    backbone: Callable[[], nn.Module]
    levels: tuple[str, ...]
    head_channels: int
    refine_channels: int
    min_size: int
    max_size: int


def _resnet_fpn(body: Callable[..., nn.Module]) -> Callable[[], nn.Module]:
    # from scratch: every stage trains
    return lambda: _resnet_fpn_extractor(body(weights=None), trainable_layers=5)


RESNET_LEVELS = ("0", "1", "2", "3")  # strides 4, 8, 16, 32
SIZES = {
    "simpleseg_resnet50_fpn": Size(_resnet_fpn(resnet50), RESNET_LEVELS, 128, 32, 800,
                                   1333),
    "simpleseg_resnet101_fpn": Size(_resnet_fpn(resnet101), RESNET_LEVELS, 128, 32,
                                    800, 1333),
    "simpleseg_tiny": Size(TinyBackbone, ("0", "1", "2"), 64, 16, 256, 512),
}


def settings_of(params: Mapping) -> dict:
    """The size's settings: `DEFAULTS` and the size's widths under ``params``, checked."""
    size = SIZES[params["name"]]
    given = {k: v for k, v in params.items() if k in PARAMETER_KEYS and v is not None}
    merged = {**DEFAULTS, "head_channels": size.head_channels,
              "refine_channels": size.refine_channels, "min_size": size.min_size,
              "max_size": size.max_size, **given}
    return _checked(merged)


# --- the network -----------------------------------------------------------------------------

def _conv_gn(in_ch: int, out_ch: int) -> nn.Sequential:
    """3x3 conv + GroupNorm + ReLU (GroupNorm: CPU batches hold one or two images)."""
    groups = 32 if out_ch % 32 == 0 else 8
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
                         nn.GroupNorm(groups, out_ch), nn.ReLU(inplace=True))


def _head(channels: int, outputs: int) -> nn.Sequential:
    """3x3 conv block + 1x1 conv to ``outputs`` channels."""
    head = nn.Sequential(_conv_gn(channels, channels), nn.Conv2d(channels, outputs, 1))
    nn.init.normal_(head[-1].weight, std=0.01)
    nn.init.zeros_(head[-1].bias)
    return head


class Refine(nn.Module):
    """A residual correction of the upsampled maps at full resolution, guided by the image.

    Stride-4 maps upsampled bilinearly blur every outline over a few pixels, which costs a
    small object a tenth of its IoU (measured on the overfit images: mask IoU 0.80-0.93
    without, however long it trains). Two 3x3 convs on [maps, image] snap outlines to the
    image's edges. The last conv starts at zero: training starts from the plain upsampling.
    """

    def __init__(self, maps: int, channels: int):
        super().__init__()
        self.body = nn.Sequential(_conv_gn(maps + 3, channels), _conv_gn(channels, channels),
                                  nn.Conv2d(channels, maps, 3, padding=1))
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, maps: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """``maps`` float [B, M, H, W], ``image`` float [B, 3, H, W] -> [B, M, H, W]."""
        return maps + self.body(torch.cat([maps, image], 1))


class SimpleInstanceSeg(nn.Module):
    """Backbone + FPN fused at stride 4 + semantic, centre and offset heads; grouping in
    eval mode. The model contract (`instseg_pipeline.models`) in and out."""

    def __init__(self, backbone: nn.Module, levels: tuple[str, ...], num_classes: int,
                 settings: Mapping):
        super().__init__()
        channels = int(settings["head_channels"])
        self.transform = GeneralizedRCNNTransform(int(settings["min_size"]),
                                                  int(settings["max_size"]),
                                                  IMAGE_MEAN, IMAGE_STD)
        self.backbone = backbone
        self.levels = tuple(levels)
        self.fuse = nn.ModuleList([_conv_gn(backbone.out_channels, channels)
                                   for _ in self.levels])
        self.semantic_head = _head(channels, num_classes)
        self.center_head = _head(channels, 1)
        self.offset_head = _head(channels, 2)
        refine = int(settings["refine_channels"])
        self.refine = Refine(num_classes + 3, refine) if refine else None
        self.settings = dict(settings)

    @property
    def score_threshold(self) -> float:
        return float(self.settings["score_threshold"])

    @property
    def detections_per_img(self) -> int:
        return int(self.settings["top_k"])

    def predict_maps(self, batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``batch`` float [B, 3, H, W] (normalised, padded) -> semantic logits [B, C, H, W],
        centre heat [B, 1, H, W], offsets [B, 2, H, W] (dy, dx in pixels)."""
        features: OrderedDict = self.backbone(batch)
        first = features[self.levels[0]]
        fused = self.fuse[0](first)
        for name, conv in zip(self.levels[1:], self.fuse[1:]):
            fused = fused + F.interpolate(conv(features[name]), size=first.shape[-2:],
                                          mode="bilinear", align_corners=False)
        maps = torch.cat([self.semantic_head(fused), self.center_head(fused),
                          self.offset_head(fused)], 1)
        maps = F.interpolate(maps, size=batch.shape[-2:], mode="bilinear", align_corners=False)
        if self.refine is not None:
            maps = self.refine(maps, batch)
        classes = maps.shape[1] - 3
        return maps[:, :classes], maps[:, classes:classes + 1], maps[:, classes + 1:]

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None):
        """Train mode: ``{loss name: scalar}``; eval mode: one contract dict per image."""
        if self.training and targets is None:
            raise ValueError("SimpleInstanceSeg in train mode needs targets")
        original = [(image.shape[-2], image.shape[-1]) for image in images]
        batch, targets = self.transform(images, targets)
        semantic, center, offset = self.predict_maps(batch.tensors)
        if self.training:
            return self.losses(semantic, center, offset, batch.image_sizes, targets)
        return [self.instances(semantic[i], center[i, 0], offset[i], batch.image_sizes[i],
                               original[i]) for i in range(len(images))]

    # --- train -------------------------------------------------------------------------------

    def losses(self, semantic, center, offset, sizes, targets) -> dict[str, torch.Tensor]:
        """The weighted losses of maps at the padded size against ``targets`` (resized)."""
        s = self.settings
        padded = tuple(semantic.shape[-2:])
        built = [build_targets(t["masks"][:, :h, :w], t["labels"], _crowd(t), padded,
                               s["center_sigma"]) for t, (h, w) in zip(targets, sizes)]
        sem_t = torch.stack([b.semantic for b in built])
        valid = torch.stack([b.valid for b in built]).to(center.dtype)
        instance = torch.stack([b.instance for b in built]).to(center.dtype)
        weights = [mask_weights(t) for t in targets]
        pixel_weights = None
        if any(w is not None for w in weights):
            pixel_weights = torch.stack([
                b.pixel_weights(torch.ones(len(t["labels"])) if w is None else w.float())
                for b, t, w in zip(built, targets, weights)]).to(instance)
        ce = _hard_pixel_ce(semantic.float(), sem_t, s["semantic_top_k"], pixel_weights)
        squared = (center[:, 0].float() - torch.stack([b.center for b in built])) ** 2
        l1 = (offset.float() - torch.stack([b.offset for b in built])).abs().sum(1)
        if pixel_weights is not None:
            l1 = l1 * pixel_weights
        return {
            "loss_semantic": s["semantic_weight"] * ce,
            "loss_center": s["center_weight"] * (squared * valid).sum()
            / valid.sum().clamp(min=1.0),
            "loss_offset": s["offset_weight"] * (l1 * instance).sum()
            / instance.sum().clamp(min=1.0),
        }

    # --- eval --------------------------------------------------------------------------------

    def instances(self, semantic, center, offset, size, original) -> dict[str, torch.Tensor]:
        """One image's contract output from its maps (padded size), its resized ``size``
        and ``original`` input size."""
        h, w = size
        s = self.settings
        groups = group_pixels(semantic[:, :h, :w].float().softmax(0), center[:h, :w].float(),
                              offset[:, :h, :w].float(), s["center_threshold"],
                              s["nms_kernel"], s["top_k"], s["score_threshold"])
        # a blank plane rides along: interpolate refuses zero channels (no detections)
        planes = torch.cat([groups.masks, torch.zeros_like(groups.masks[:1].sum(0))[None]])
        masks = F.interpolate(planes[None], size=original, mode="bilinear",
                              align_corners=False)[0, :-1]
        boxes = tight_boxes(masks)
        # a sliver can vanish when the mask shrinks to the input size: no box, no instance
        keep = boxes[:, 0] < boxes[:, 2]
        return {"boxes": boxes[keep], "labels": groups.labels[keep],
                "scores": groups.scores[keep], "masks": masks[keep][:, None]}


def _hard_pixel_ce(logits: torch.Tensor, target: torch.Tensor, share: float,
                   weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of ``logits`` [B, C, H, W] against ``target`` int64 [B, H, W]
    averaged over the ``share`` of scored (not `IGNORE`) pixels with the largest loss;
    with ``weights`` float [B, H, W] each pixel's loss is weighted before the selection.

    Panoptic-DeepLab's hard-pixel mining (share 0.2): background fills most of an image
    and, averaged over every pixel, drowns the class of small objects; share 1.0 is plain
    cross-entropy.
    """
    pixels = F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="none")
    pixels = (pixels if weights is None else pixels * weights).flatten()
    scored = int((target != IGNORE).sum())
    if scored == 0:
        return pixels.sum() * 0.0  # keeps the graph: every parameter gets a (zero) gradient
    return pixels.topk(max(1, math.ceil(share * scored))).values.mean()


def _crowd(target: Mapping) -> torch.Tensor:
    """bool [K]: which of a target's instances are crowd regions (none without iscrowd)."""
    crowd = target.get("iscrowd")
    if crowd is None:
        return torch.zeros(len(target["labels"]), dtype=torch.bool)
    return torch.as_tensor(crowd).bool()


# --- the family ------------------------------------------------------------------------------

def build(params: Mapping, num_classes: int) -> SimpleInstanceSeg:
    """The network of size ``params["name"]`` for ``num_classes`` (background included)."""
    size = SIZES[params["name"]]
    return SimpleInstanceSeg(size.backbone(), size.levels, num_classes, settings_of(params))


def resolve(params: Mapping) -> dict:
    """The settings `model_config` saves (every key, defaults resolved)."""
    return settings_of(params)


def postprocess_cuts(network: SimpleInstanceSeg) -> dict:
    """The score threshold and detection cap the grouping applies."""
    return {"score_threshold": network.score_threshold,
            "detections_per_img": network.detections_per_img}


ONNX = OnnxSpec(
    exportable=True, tracing=eager_exact_resize, exporter="torchscript",
    note="TorchScript exporter, grouping included (max-pool NMS, top-k, nearest-centre "
         "assignment traced with dynamic shapes); one image per run; eager_exact_resize "
         "keeps the traced resize equal to eager's; trace on an image with detections")


def _family(name: str) -> ModelFamily:
    return ModelFamily(name=name, build=build, keys=PARAMETER_KEYS, loss_names=LOSS_NAMES,
                       onnx=ONNX, postprocess_cuts=postprocess_cuts, resolve=resolve,
                       section=SECTION)


FAMILIES = tuple(_family(name) for name in SIZES)
