"""The ``evaluation`` parameters block as a typed, frozen config
(conf/base/parameters_evaluation.yml); built once in each evaluation node.

Defaults equal the base YAML's values. No torch, no Kedro here: the evaluation CLIs import
this package without them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from instseg_pipeline.config_schema import Schema


@dataclass(frozen=True, kw_only=True)
class CityscapesConfig:
    """Cityscapes-style AP / AP50 (official rules)."""

    min_region_size: int = 100              # pixels; smaller GT regions are ignored


@dataclass(frozen=True, kw_only=True)
class PanopticConfig:
    """Instance predictions (+ a semantic family's stuff map) -> one non-overlapping id map
    per image (`predict.panoptic.combine_panoptic`), then PQ."""

    score_threshold: float = 0.5
    overlap_threshold: float = 0.5
    min_area: int = 1                       # fewest free pixels a thing segment keeps
    # fewest free pixels a stuff segment keeps; detectron2 uses 4096 at COCO sizes
    # (conf/coco_panoptic), 256 suits the ~200-300 px images of the synthetic source
    stuff_min_area: int = 256


@dataclass(frozen=True, kw_only=True)
class FiguresConfig:
    """Sizes of the evaluation figures."""

    suite_images: int = 4                   # rows of the visualisation suite
    worst_best: int = 3                     # worst and best images shown each
    gallery: int = 12                       # crops per false-positive / false-negative gallery
    panoptic: int = 3                       # rows of the panoptic overlay


@dataclass(frozen=True, kw_only=True)
class EvaluationConfig(Schema):
    """Everything under ``evaluation:``."""

    BLOCK = "evaluation"

    split: str = "val"
    batch_size: int = 4
    device: str = "auto"                    # auto | cpu | cuda[:N]
    score_threshold: float = 0.05           # predictions kept for COCO AP (low, as papers do)
    mask_threshold: float = 0.5             # mask probability -> binary mask
    backend: Literal["faster-coco-eval", "pycocotools"] = "faster-coco-eval"
    iou_types: tuple[Literal["segm", "bbox"], ...] = ("segm", "bbox")
    match_score_threshold: float = 0.5      # predictions matched to GT for IoU / confusions
    allow_pseudo_masks: bool = False        # score against pseudo-masks (mask_source not
                                            # annotated) instead of refusing them, with a WARNING
    cityscapes: CityscapesConfig = field(default_factory=CityscapesConfig)
    panoptic: PanopticConfig = field(default_factory=PanopticConfig)
    figures: FiguresConfig = field(default_factory=FiguresConfig)
