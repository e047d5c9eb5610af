"""The backbones of the YOLACT++ family: ResNet-50/101 with deformable convs in C3-C5 (the
papers') and a small from-scratch one for CPU; each returns five FPN levels
``{"0", "1", "2", "p6", "p7"}``."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn
from torchvision.models import resnet50, resnet101
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import DeformConv2d
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7

from instseg_pipeline.models.tiny import _conv

TINY_CHANNELS = (32, 64, 128, 256)  # stem, C3..C5 (strides 2, 4, 8, 16)


class DeformableConv(nn.Module):
    """Modulated deformable 3x3 conv (DCNv2): a plain conv predicts 2x9 offsets and 9
    modulation scalars per output pixel. The offset conv starts at zero, so the layer starts
    as a regular conv with every tap weighted 0.5."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.offset = nn.Conv2d(in_channels, 27, 3, stride, 1)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)
        self.conv = DeformConv2d(in_channels, out_channels, 3, stride, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """float [B, C_in, H, W] -> [B, C_out, H / stride, W / stride]."""
        offset = self.offset(x)
        return self.conv(x, offset[:, :18], torch.sigmoid(offset[:, 18:]))


def _uses_dcn(block_index: int, interval: int) -> bool:
    """YOLACT++'s interval: blocks 0, interval, 2 * interval, ... of each stage."""
    return interval > 0 and block_index % interval == 0


def add_deformable_convs(body: nn.Module, interval: int) -> int:
    """Swap the 3x3 conv of every ``interval``-th bottleneck of C3-C5 (torchvision's
    layer2-4) for a `DeformableConv` with the same stride; return how many."""
    count = 0
    for stage in (body.layer2, body.layer3, body.layer4):
        for index, block in enumerate(stage):
            if _uses_dcn(index, interval):
                conv = block.conv2
                block.conv2 = DeformableConv(conv.in_channels, conv.out_channels,
                                             conv.stride[0])
                count += 1
    return count


def resnet_fpn(depth: str, channels: int, dcn_interval: int) -> nn.Module:
    """ResNet-50/101 (weights None) + FPN over C3-C5 with P6, P7 from P5 ->
    ``{"0": P3, "1": P4, "2": P5, "p6": P6, "p7": P7}``, ``channels`` each."""
    body = {"resnet50": resnet50, "resnet101": resnet101}[depth](weights=None)
    add_deformable_convs(body, dcn_interval)
    return BackboneWithFPN(body, {"layer2": "0", "layer3": "1", "layer4": "2"},
                           [512, 1024, 2048], channels,
                           extra_blocks=LastLevelP6P7(channels, channels))


def _tiny_stage(in_ch: int, out_ch: int, deformable: bool) -> nn.Sequential:
    """Halve the resolution, then one more 3x3 conv (deformable or not) + GroupNorm."""
    second = (nn.Sequential(DeformableConv(out_ch, out_ch), nn.GroupNorm(8, out_ch),
                            nn.ReLU(inplace=True)) if deformable else _conv(out_ch, out_ch))
    return nn.Sequential(_conv(in_ch, out_ch, stride=2), second)


class TinyFPN(nn.Module):
    """A small from-scratch backbone for CPU: GroupNorm convs and an FPN of five levels
    ``{"0", "1", "2", "p6", "p7"}`` at strides 4-64, one stride-2 step finer than P3-P7:
    on the 96-256 px images it is meant for, objects then still span a few cells of the
    level their anchors sit on, and the prototypes (stride 2) resolve their outlines.

    One stage = one block, so with any interval every stage would have its deformable conv;
    C3 keeps a plain conv because on CPU the deformable backward at stride 4 costs more than
    the rest of a training step (C4 and C5 keep theirs, so the deformable path is trained).
    """

    def __init__(self, channels: int, dcn_interval: int):
        super().__init__()
        stem, c3, c4, c5 = TINY_CHANNELS
        dcn = _uses_dcn(0, dcn_interval)
        self.stem = _conv(3, stem, stride=2)
        self.stages = nn.ModuleList([_tiny_stage(stem, c3, False), _tiny_stage(c3, c4, dcn),
                                     _tiny_stage(c4, c5, dcn)])
        self.fpn = FeaturePyramidNetwork([c3, c4, c5], channels,
                                         extra_blocks=LastLevelP6P7(channels, channels))
        self.out_channels = channels

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        x = self.stem(images)
        features = OrderedDict()
        for name, stage in zip(("0", "1", "2"), self.stages):
            x = stage(x)
            features[name] = x
        return self.fpn(features)
