"""The SOLOv2 network: backbone + FPN (P2-P6), the category and dynamic-kernel branches on
S x S grids, the unified mask-feature branch, its losses and its inference.

Shapes: B images, E kernel channels (the mask feature width), C - 1 foreground classes,
S the grid of a level, h x w the mask-feature size (1/4 of the padded batch).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import sigmoid_focal_loss

from instseg_pipeline.models.contract import mask_weights
from instseg_pipeline.models.solov2_ops import (
    assign_targets,
    coordinates,
    dice_loss,
    matrix_nms,
    points_nms,
    tight_boxes,
)

IMAGE_MEAN = [0.485, 0.456, 0.406]
IMAGE_STD = [0.229, 0.224, 0.225]
# feature strides of the five head levels: P2 is pooled to P3's size and P6 brought up to
# P5's, as in the SOLO code (the grids, not the features, set each level's resolution)
LEVEL_STRIDES = (8, 8, 16, 32, 32)
MASK_STRIDE = 4
PRIOR_PROBABILITY = 0.01


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups for the paper's widths, fewer (>= 4 channels each) for narrow
    test sizes."""
    return nn.GroupNorm(math.gcd(32, max(channels // 4, 1)), channels)


def conv_gn(in_ch: int, out_ch: int) -> nn.Sequential:
    """3x3 conv + GroupNorm + ReLU (every conv of the heads)."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
                         group_norm(out_ch), nn.ReLU(inplace=True))


@dataclass(frozen=True)
class HeadConfig:
    """Widths and settings of the heads (see `solov2.DEFAULTS` and `solov2.SIZES`)."""

    num_classes: int                      # background included
    in_channels: int                      # FPN width
    head_channels: int                    # category / kernel branch width
    head_convs: int                       # convs in each of those branches
    mask_channels: int                    # mask-feature branch width
    kernel_channels: int                  # E: the dynamic kernel size (1x1 conv, E inputs)
    num_grids: tuple[int, ...]
    scale_ranges: tuple[tuple[float, float], ...]   # already scaled to min_size
    center_sigma: float
    focal_alpha: float
    focal_gamma: float
    cate_loss_weight: float
    dice_loss_weight: float
    score_threshold: float
    mask_threshold: float
    pre_nms_top_k: int
    update_threshold: float
    max_per_image: int
    kernel: str
    sigma: float
    mask_loss_stride: int = MASK_STRIDE     # input pixels per Dice-loss pixel: 4, 2 or 1


class GridHead(nn.Module):
    """The category and kernel branches, shared by every level.

    ``levels`` (five features [B, F, H_l, W_l]) -> (category logits [B, C-1, S, S],
    kernels [B, E, S, S]) per level. Both branches see the level resized to S x S; the
    kernel branch also sees the two coordinate channels (CoordConv).
    """

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        width = cfg.head_channels
        self.num_grids = cfg.num_grids
        self.kernel_convs = nn.Sequential(*[conv_gn(cfg.in_channels + 2 if i == 0 else width,
                                                    width) for i in range(cfg.head_convs)])
        self.cate_convs = nn.Sequential(*[conv_gn(cfg.in_channels if i == 0 else width, width)
                                          for i in range(cfg.head_convs)])
        self.kernel_out = nn.Conv2d(width, cfg.kernel_channels, 3, padding=1)
        self.cate_out = nn.Conv2d(width, cfg.num_classes - 1, 3, padding=1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # focal loss start: every cell predicts background with probability 0.99
        nn.init.constant_(self.cate_out.bias, -math.log((1 - PRIOR_PROBABILITY)
                                                        / PRIOR_PROBABILITY))

    def forward(self, levels: Sequence[torch.Tensor]):
        cates, kernels = [], []
        for feature, grid in zip(levels, self.num_grids):
            with_coords = torch.cat([feature, coordinates(feature)], 1)
            gridded = F.interpolate(with_coords, size=(grid, grid), mode="bilinear",
                                    align_corners=False)
            kernels.append(self.kernel_out(self.kernel_convs(gridded)))
            cates.append(self.cate_out(self.cate_convs(gridded[:, :-2])))
        return cates, kernels


class MaskFeatureBranch(nn.Module):
    """P2-P5 -> the unified mask feature [B, E, h, w] at 1/4 scale.

    Level l gets max(l, 1) conv + GN + ReLU stages with a 2x bilinear upsampling after each
    of the first l; the deepest level (P5) also gets the coordinate channels. The levels
    are summed, then a 1x1 conv + GN + ReLU gives E channels.
    """

    def __init__(self, in_channels: int, width: int, out_channels: int, num_levels: int = 4):
        super().__init__()
        self.levels = nn.ModuleList()
        for level in range(num_levels):
            first = in_channels + (2 if level == num_levels - 1 else 0)
            convs = [conv_gn(first if i == 0 else width, width) for i in range(max(level, 1))]
            self.levels.append(nn.ModuleList(convs))
        self.fuse = nn.Sequential(nn.Conv2d(width, out_channels, 1, bias=False),
                                  group_norm(out_channels), nn.ReLU(inplace=True))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        total = None
        last = len(self.levels) - 1
        for level, (x, convs) in enumerate(zip(features, self.levels)):
            if level == last:
                x = torch.cat([x, coordinates(x)], 1)
            for i, conv in enumerate(convs):
                x = conv(x)
                if level > 0:
                    x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            total = x if total is None else total + x
        return self.fuse(total)


def head_levels(features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """P2-P6 -> the five head inputs: P2 resized to P3's size, P6 to P5's (strides 8, 8,
    16, 32, 32)."""
    p2, p3, p4, p5, p6 = features
    down = F.interpolate(p2, size=p3.shape[-2:], mode="bilinear", align_corners=False)
    up = F.interpolate(p6, size=p5.shape[-2:], mode="bilinear", align_corners=False)
    return [down, p3, p4, p5, up]


class SOLOv2(nn.Module):
    """SOLOv2 under the project's model contract (see `instseg_pipeline.models`).

    ``backbone(images [B, 3, H, W])`` must return five features P2-P6 (strides 4-64, an
    ordered dict) with ``backbone.out_channels`` channels.
    """

    def __init__(self, backbone: nn.Module, cfg: HeadConfig, min_size, max_size: int):
        super().__init__()
        self.cfg = cfg
        self.transform = GeneralizedRCNNTransform(min_size, max_size, IMAGE_MEAN, IMAGE_STD,
                                                  size_divisible=32)
        self.backbone = backbone
        self.head = GridHead(cfg)
        self.mask_branch = MaskFeatureBranch(cfg.in_channels, cfg.mask_channels,
                                             cfg.kernel_channels)

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None):
        if self.training and targets is None:
            raise ValueError("SOLOv2 in train mode needs targets")
        original_sizes = [tuple(image.shape[-2:]) for image in images]
        batch, _ = self.transform(images)
        if self.training:
            targets = [resized_target(t, size, batch.image_sizes[i])
                       for i, (t, size) in enumerate(zip(targets, original_sizes))]
        features = list(self.backbone(batch.tensors).values())
        mask_features = self.mask_branch(features[:4])
        cates, kernels = self.head(head_levels(features))
        if self.training:
            return self.losses(cates, kernels, mask_features, targets, batch.tensors.shape[-2:])
        return [self.predict_one(
            [c[i:i + 1] for c in cates], [k[i:i + 1] for k in kernels], mask_features[i],
            batch.image_sizes[i], original_sizes[i]) for i in range(len(images))]

    # --- training ------------------------------------------------------------------------------

    def losses(self, cates, kernels, mask_features, targets, padded_size) -> dict:
        """``{"loss_cate": focal, "loss_mask": Dice}`` with the paper's weights applied.

        A target's ``mask_weights`` (`contract.mask_weights`) multiply the Dice term of each
        positive cell by the weight of the instance owning it; the mean stays over all
        positive cells. The category loss is not weighted."""
        cfg = self.cfg
        cate_logits, cate_targets, mask_logits, mask_targets = [], [], [], []
        weights = [mask_weights(t) for t in targets]
        cell_weights = [] if any(w is not None for w in weights) else None
        for i, target in enumerate(targets):
            masks = padded_masks(target["masks"], padded_size)
            loss_size = [int(side) // cfg.mask_loss_stride for side in padded_size]
            small = downsampled_masks(masks, loss_size)
            assigned = assign_targets(target["boxes"], target["labels"], masks, cfg.num_grids,
                                      cfg.scale_ranges, cfg.center_sigma)
            for cate, kernel, level in zip(cates, kernels, assigned):
                cate_logits.append(cate[i].flatten(1).T)                     # [S*S, C-1]
                cate_targets.append(level.labels.flatten())
                positive = torch.nonzero(level.owner.flatten() >= 0).reshape(-1)
                if positive.numel():
                    chosen = kernel[i].flatten(1)[:, positive].T             # [P, E]
                    logits = chosen @ mask_features[i].flatten(1)           # [P, h*w]
                    mask_logits.append(upsampled(logits, mask_features.shape[-2:],
                                                 loss_size))
                    owners = level.owner.flatten()[positive]
                    mask_targets.append(small[owners].flatten(1))
                    if cell_weights is not None:
                        cell_weights.append(_instance_weights(weights[i], target)[owners])
        labels = torch.cat(cate_targets)
        num_pos = int((labels > 0).sum())
        onehot = F.one_hot(labels, cfg.num_classes)[:, 1:].to(mask_features.dtype)
        loss_cate = sigmoid_focal_loss(torch.cat(cate_logits), onehot, cfg.focal_alpha,
                                       cfg.focal_gamma, reduction="sum") / (num_pos + 1)
        if mask_logits:
            dice = dice_loss(torch.cat(mask_logits), torch.cat(mask_targets))
            loss_mask = (dice.mean() if cell_weights is None else
                         (dice * torch.cat(cell_weights).to(dice)).sum() / dice.shape[0])
        else:  # nothing positive: a zero that still reaches every kernel parameter
            loss_mask = sum(k.sum() for k in kernels) * 0.0
        return {"loss_cate": loss_cate * cfg.cate_loss_weight,
                "loss_mask": loss_mask * cfg.dice_loss_weight}

    # --- inference -----------------------------------------------------------------------------

    def predict_one(self, cates, kernels, mask_feature, image_size, original_size) -> dict:
        """One image's eval output from its per-level head outputs (batch of one) and its
        mask feature [E, h, w]; ``image_size`` is the resized size inside the padded batch,
        ``original_size`` the input's."""
        cfg = self.cfg
        scores = torch.cat([points_nms(c.sigmoid()).flatten(2)[0].T for c in cates])
        kernel = torch.cat([k.flatten(2)[0].T for k in kernels])              # [L, E]
        strides = torch.cat([torch.full((g * g,), float(s), device=kernel.device)
                             for g, s in zip(cfg.num_grids, LEVEL_STRIDES)])
        where = torch.nonzero(scores > cfg.score_threshold)                   # [N, 2]
        cells, classes = where[:, 0], where[:, 1]
        scores = scores[cells, classes]
        # masks stay flat [N, h*w] until `full_size`: ONNX Runtime rewrites a reshape of
        # them to [0, -1], which fails on zero rows
        logits = kernel[cells] @ mask_feature.flatten(1)                     # [N, h*w]
        probs = logits.sigmoid()
        binary = probs > cfg.mask_threshold
        areas = binary.sum(1).float()
        # too small for its level (fewer pixels than the stride) means no instance there
        keep = torch.nonzero(areas > strides[cells]).reshape(-1)
        logits, probs, binary, areas = logits[keep], probs[keep], binary[keep], areas[keep]
        classes, scores = classes[keep], scores[keep]
        maskness = (probs * binary).sum(1) / areas.clamp(min=1)
        scores, order = matrix_nms(binary, classes, scores * maskness, cfg.kernel, cfg.sigma,
                                   cfg.pre_nms_top_k, cfg.update_threshold,
                                   cfg.max_per_image, areas)
        masks = self.full_size(logits[order], mask_feature.shape[-2:], image_size,
                               original_size)
        return {"boxes": tight_boxes(masks[:, 0] >= cfg.mask_threshold),
                "labels": classes[order] + 1, "scores": scores, "masks": masks}

    @staticmethod
    def full_size(logits, feature_size, image_size, original_size) -> torch.Tensor:
        """Probabilities float [N, 1, H, W] at the input size from logits [N, h*w] at 1/4
        of the padded batch: up to the padded size, the padding cropped, resized to the
        input, then the sigmoid (logits, not probabilities, are interpolated: the mask loss
        compares upsampled logits when ``mask_loss_stride`` < 4)."""
        # one spare row, dropped at the end, keeps every reshape and resize non-empty: the
        # exported graph then runs images without detections too
        n = logits.shape[0]
        logits = torch.cat([logits, logits.new_zeros((1, logits.shape[1]))])
        grid = logits.reshape(n + 1, 1, feature_size[0], feature_size[1])
        padded = (feature_size[0] * MASK_STRIDE, feature_size[1] * MASK_STRIDE)
        up = F.interpolate(grid, size=padded, mode="bilinear", align_corners=False)
        cropped = up[:, :, :image_size[0], :image_size[1]]
        return F.interpolate(cropped, size=original_size, mode="bilinear",
                             align_corners=False)[:n].sigmoid()


def _instance_weights(weights: torch.Tensor | None, target: dict) -> torch.Tensor:
    """float [K]: a target's mask weights, ones when it has none (or all are 1)."""
    if weights is None:
        return torch.ones(len(target["labels"]), device=target["labels"].device)
    return weights.to(target["labels"].device)


def resized_target(target: dict, size, new_size) -> dict:
    """``target`` (boxes, labels, masks uint8 [K, H, W]) at the resized image size.

    Masks: bilinear, then >= 0.5, which keeps them on the resized image's pixels. (The
    transform's own nearest resize samples pixel ``floor(i * H / h)``, half a pixel off the
    image's bilinear resize: on 30-pixel objects that alone caps the mask IoU near 0.9.)
    """
    masks = target["masks"]
    if masks.shape[0]:
        masks = F.interpolate(masks[:, None].float(), size=tuple(new_size), mode="bilinear",
                              align_corners=False)[:, 0] >= 0.5
    else:
        masks = masks.new_zeros((0, *new_size))
    ratio_y, ratio_x = (float(n) / float(o) for n, o in zip(new_size, size))
    scale = torch.tensor([ratio_x, ratio_y, ratio_x, ratio_y], device=target["boxes"].device)
    return {**target, "boxes": target["boxes"] * scale, "masks": masks.to(torch.uint8)}


def padded_masks(masks: torch.Tensor, size) -> torch.Tensor:
    """uint8 [K, H', W'] masks zero-padded at the bottom and right to ``size`` (the batch)."""
    height, width = masks.shape[-2:]
    return F.pad(masks, (0, int(size[1]) - width, 0, int(size[0]) - height))


def upsampled(logits: torch.Tensor, size, target_size) -> torch.Tensor:
    """Mask logits [P, h*w] at the feature size ``size`` -> [P, H*W] at ``target_size``
    (bilinear; the same tensor when the sizes agree)."""
    if tuple(size) == tuple(target_size):
        return logits
    grid = logits.reshape(-1, 1, *size)
    return F.interpolate(grid, size=tuple(target_size), mode="bilinear",
                         align_corners=False).flatten(1)


def downsampled_masks(masks: torch.Tensor, size) -> torch.Tensor:
    """float [K, h, w] mask targets at the mask-feature size: the fraction of each 4x4
    block that is foreground. Soft edges keep sub-pixel boundaries that binarised targets
    (the SOLO code's) round to the 4-pixel grid: on 30-pixel objects their upsampled
    outline alone costs 10-15 points of mask IoU."""
    if masks.shape[0] == 0:
        return masks.new_zeros((0, *size), dtype=torch.float32)
    return F.interpolate(masks[:, None].float(), size=tuple(size), mode="area")[:, 0]
