"""The SOLOv2 family (Wang et al., "SOLOv2: Dynamic and Fast Instance Segmentation",
NeurIPS 2020), native torch + torchvision ops.

Sizes (``training.model.name``):

- ``solov2_resnet50_fpn``, ``solov2_resnet101_fpn``: the paper's model, heads of 4 convs x
  512 channels, E = 256 kernel channels, mask features 128 wide (input 800 / 1333);
- ``solov2_light_resnet50_fpn``: SOLOv2-Light 448 (heads of 2 convs x 256, E = 128, input
  448 / 768);
- ``solov2_tiny``: a from-scratch GroupNorm backbone (32-64-128-256, 64-channel FPN), heads
  of 2 convs x 64, E = 64, mask features 32 wide; for CPU tests.

The network (`solov2_net`): FPN P2-P6; a category branch and a dynamic-kernel branch
(CoordConv) on S x S grids per level; a mask-feature branch fusing P2-P5 at 1/4 scale; the
kernel of a grid cell is a 1x1 convolution over the mask feature. Training: centre-region
assignment (`solov2_ops.assign_targets`), focal loss for categories, Dice for masks (weight
3) against area-averaged masks at 1/4 scale (``mask_loss_stride`` 2 or 1: against masks at
1/2 or full input resolution, the predictions upsampled; for inputs of ~128 px, where an
object spans a few mask-feature pixels; a target's ``mask_weights`` weight each positive
cell's Dice term by its instance's weight). Inference: 2x2 peak picking, score threshold, maskness rescoring, Matrix NMS
(`solov2_ops.matrix_nms`), masks as probabilities at the input size. SOLO has no box head:
the boxes of the eval output are the tight boxes of the binary masks (probability >= 0.5).

Settings: `DEFAULTS` (``training.families.solov2``, shared by every size) and `SIZES` (each
size's widths and input size); ``training.model`` overrides any of them. ``scale_ranges``
are the paper's, for a ``scale_reference`` (800 px) shorter side; the network scales them by
``min_size / scale_reference``, so a 128 px input assigns an object of 32 px where the
paper assigns one of 200 px at 800 px.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from itertools import pairwise

import torch
from torch import nn
from torchvision.models import resnet50, resnet101
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from instseg_pipeline.models.contract import ModelFamily, OnnxSpec
from instseg_pipeline.models.maskrcnn import eager_exact_resize
from instseg_pipeline.models.solov2_net import LEVEL_STRIDES, HeadConfig, SOLOv2
from instseg_pipeline.models.solov2_ops import KERNELS
from instseg_pipeline.models.tiny import _conv

SECTION = "solov2"  # training.families.solov2
LOSS_NAMES = ("loss_cate", "loss_mask")

# the paper's settings (mmdet's SOLOv2 R50 config); the YAML block repeats them
DEFAULTS = {
    "num_grids": [40, 36, 24, 16, 12],
    "scale_ranges": [[1, 96], [48, 192], [96, 384], [192, 768], [384, 2048]],
    "scale_reference": 800,
    "center_sigma": 0.2,
    "focal_alpha": 0.25,
    "focal_gamma": 2.0,
    "cate_loss_weight": 1.0,
    "dice_loss_weight": 3.0,
    "score_threshold": 0.1,
    "mask_threshold": 0.5,
    "pre_nms_top_k": 500,
    "update_threshold": 0.05,
    "max_per_image": 100,
    "kernel": "gaussian",
    "sigma": 2.0,
    "mask_loss_stride": 4,
    # null: the size's own (`SIZES`)
    "head_channels": None,
    "head_convs": None,
    "mask_channels": None,
    "kernel_channels": None,
}
SIZE_KEYS = ("head_channels", "head_convs", "mask_channels", "kernel_channels",
             "min_size", "max_size")
SIZES = {
    "solov2_resnet50_fpn": (512, 4, 128, 256, 800, 1333),
    "solov2_resnet101_fpn": (512, 4, 128, 256, 800, 1333),
    "solov2_light_resnet50_fpn": (256, 2, 128, 128, 448, 768),
    "solov2_tiny": (64, 2, 32, 64, 256, 512),
}
BACKBONES = {"solov2_resnet50_fpn": "resnet50", "solov2_resnet101_fpn": "resnet101",
             "solov2_light_resnet50_fpn": "resnet50", "solov2_tiny": "tiny"}
KEYS = tuple(dict.fromkeys((*DEFAULTS, *SIZE_KEYS)))
TINY_CHANNELS = (32, 64, 128, 256)
TINY_FPN = 64


# --- backbones ---------------------------------------------------------------------------------

class TinyPyramid(nn.Module):
    """``images [B, 3, H, W] -> P2-P6`` (strides 4-64, ``out_channels`` each): a stride-2
    stem, four stages of two GroupNorm convs (32-64-128-256), an FPN and a max-pooled P6."""

    def __init__(self, channels: tuple[int, ...] = TINY_CHANNELS, out_channels: int = TINY_FPN):
        super().__init__()
        self.stem = _conv(3, channels[0], stride=2)
        widths = (channels[0], *channels)
        self.stages = nn.ModuleList([nn.Sequential(_conv(a, b, stride=2), _conv(b, b))
                                     for a, b in pairwise(widths)])
        self.fpn = FeaturePyramidNetwork(list(channels), out_channels,
                                         extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        x = self.stem(images)
        features = OrderedDict()
        for i, stage in enumerate(self.stages):
            x = stage(x)
            features[str(i)] = x
        return self.fpn(features)


def build_backbone(kind: str) -> nn.Module:
    """P2-P6 feature extractor of ``kind``: ``resnet50``/``resnet101`` (torchvision, BatchNorm,
    every stage trainable, no weights) + 256-channel FPN with max-pooled P6, or ``tiny``."""
    if kind == "tiny":
        return TinyPyramid()
    body = {"resnet50": resnet50, "resnet101": resnet101}[kind](weights=None)
    return _resnet_fpn_extractor(body, 5, returned_layers=[1, 2, 3, 4],
                                 extra_blocks=LastLevelMaxPool())


# --- parameters --------------------------------------------------------------------------------

def settings(name: str, params: Mapping) -> dict:
    """Every setting of size ``name``: `DEFAULTS`, the size's `SIZES`, then ``params``
    (JSON-friendly lists); checked, errors name ``training.model.<key>``."""
    given = {k: v for k, v in params.items()
             if k not in ("name", "weights") and v is not None}
    defaults = {k: v for k, v in DEFAULTS.items() if v is not None}
    merged = {**defaults, **dict(zip(SIZE_KEYS, SIZES[name])), **given}
    merged = {k: _plain(v) for k, v in merged.items()}
    _check(merged)
    return merged


def _plain(value):
    """Tuples as lists, recursively (the model config is JSON)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _fail(key: str, message: str):
    raise ValueError(f"training.model.{key}: {message}")


def _check(s: dict) -> None:
    levels = len(LEVEL_STRIDES)
    if len(s["num_grids"]) != levels or any(int(g) < 1 for g in s["num_grids"]):
        _fail("num_grids", f"expected {levels} positive grid sizes, got {s['num_grids']}")
    ranges = s["scale_ranges"]
    if len(ranges) != levels or any(len(r) != 2 or r[0] > r[1] for r in ranges):
        _fail("scale_ranges", f"expected {levels} pairs [low, high] with low <= high, got "
                              f"{ranges}")
    if int(s["mask_loss_stride"]) not in (1, 2, 4):
        _fail("mask_loss_stride", f"expected 1, 2 or 4, got {s['mask_loss_stride']}")
    if s["kernel"] not in KERNELS:
        _fail("kernel", f"expected one of {list(KERNELS)}, got {s['kernel']!r}")
    for key in ("head_channels", "head_convs", "mask_channels", "kernel_channels",
                "pre_nms_top_k", "max_per_image", "scale_reference"):
        if int(s[key]) < 1:
            _fail(key, f"expected a positive integer, got {s[key]}")
    for key in ("score_threshold", "mask_threshold", "update_threshold", "center_sigma"):
        if not 0 <= float(s[key]) <= 1:
            _fail(key, f"expected a value in [0, 1], got {s[key]}")


def scaled_ranges(s: dict) -> tuple[tuple[float, float], ...]:
    """The paper's scale ranges scaled from ``scale_reference`` to the input's shorter side
    (the last of ``min_size`` when it is a list, as torchvision's transform does in eval)."""
    min_size = s["min_size"][-1] if isinstance(s["min_size"], list) else s["min_size"]
    factor = float(min_size) / float(s["scale_reference"])
    return tuple((low * factor, high * factor) for low, high in s["scale_ranges"])


def head_config(s: dict, num_classes: int, in_channels: int) -> HeadConfig:
    return HeadConfig(
        num_classes=num_classes, in_channels=in_channels,
        head_channels=int(s["head_channels"]), head_convs=int(s["head_convs"]),
        mask_channels=int(s["mask_channels"]), kernel_channels=int(s["kernel_channels"]),
        num_grids=tuple(int(g) for g in s["num_grids"]), scale_ranges=scaled_ranges(s),
        center_sigma=float(s["center_sigma"]), focal_alpha=float(s["focal_alpha"]),
        focal_gamma=float(s["focal_gamma"]), cate_loss_weight=float(s["cate_loss_weight"]),
        dice_loss_weight=float(s["dice_loss_weight"]),
        score_threshold=float(s["score_threshold"]),
        mask_threshold=float(s["mask_threshold"]), pre_nms_top_k=int(s["pre_nms_top_k"]),
        update_threshold=float(s["update_threshold"]),
        max_per_image=int(s["max_per_image"]), kernel=str(s["kernel"]), sigma=float(s["sigma"]),
        mask_loss_stride=int(s["mask_loss_stride"]))


def _min_size(value):
    return tuple(value) if isinstance(value, list) else int(value)


def builder(name: str):
    """``build(params, num_classes)`` of size ``name``."""
    def build(params: Mapping, num_classes: int) -> SOLOv2:
        s = settings(name, params)
        backbone = build_backbone(BACKBONES[name])
        cfg = head_config(s, num_classes, backbone.out_channels)
        return SOLOv2(backbone, cfg, _min_size(s["min_size"]), int(s["max_size"]))
    return build


def postprocess_cuts(network: SOLOv2) -> dict:
    """Matrix NMS keeps decayed scores >= the update threshold, at most max_per_image."""
    return {"score_threshold": float(network.cfg.update_threshold),
            "detections_per_img": int(network.cfg.max_per_image)}


ONNX = OnnxSpec(
    exportable=True, tracing=eager_exact_resize, exporter="torchscript",
    note="TorchScript exporter, one image per run; Matrix NMS and the dynamic 1x1 kernels "
         "are matrix products and trace as they are; sorting traces as TopK (ties by the "
         "lower index, as eager's stable sort); eager_exact_resize keeps the traced resize "
         "size equal to eager's; trace on an image with detections")


def solov2_family(name: str) -> ModelFamily:
    return ModelFamily(name=name, build=builder(name), keys=KEYS, loss_names=LOSS_NAMES,
                       onnx=ONNX, postprocess_cuts=postprocess_cuts,
                       resolve=lambda params: settings(name, params), section=SECTION)


FAMILIES = tuple(solov2_family(name) for name in SIZES)
