"""The ``source`` and ``ingestion`` parameters blocks as typed, frozen configs.

conf/base/parameters_source.yml and parameters_ingestion.yml hold the project's values; the
envs (conf/coco, conf/cityscapes, conf/mask_folder, conf/ci) override single keys. One
`SourceConfig` covers every source type: keys a reader does not use are ignored by it (the
base YAML's ``annotations`` means nothing to the cityscapes reader). Defaults equal the base
YAML's values; keys only some sources use default to what those readers assumed before.
No torch, no Kedro here.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from instseg_pipeline.config_schema import Schema
from instseg_pipeline.data.images import DEFAULT_MAX_PIXELS


@dataclass(frozen=True, kw_only=True)
class SyntheticConfig:
    """Generator settings (``type: synthetic``); `sources.synthetic.generate` range-checks them
    and hashes them, so a dataset is regenerated only when one changes."""

    seed: int = 0
    num_images: int = 120
    min_size: int = 160                     # height and width drawn in [min_size, max_size]
    max_size: int = 256
    max_objects: int = 6
    empty_fraction: float = 0.08
    crowd_fraction: float = 0.1
    touching_fraction: float = 0.15
    stuff: bool = True                      # sky / ground behind the shapes + panoptic stuff


@dataclass(frozen=True, kw_only=True)
class SourceConfig(Schema):
    """Everything under ``source:``; which reader runs and where it reads.

    Every source: type, root, split, verify_images, max_image_pixels, on_invalid, workers.
    coco: annotations, images. coco_panoptic: annotations (the panoptic json), masks (its PNG
    folder), images. cityscapes: splits. mask_folder: images, masks, mask_suffix,
    mask_ext, image_glob, class_name, class_map, class_map_file. synthetic: synthetic.
    """

    BLOCK = "source"

    type: Literal["synthetic", "coco", "coco_panoptic", "cityscapes", "mask_folder"] = "synthetic"
    root: str = "data/01_raw/synthetic"
    annotations: str = "annotations.json"   # COCO json, relative to root
    images: str = "images"                  # image folder, relative to root
    split: str = ""                         # one split for every image; "" = split later
    verify_images: Literal["decode", "header"] = "decode"
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    on_invalid: Literal["skip", "fail"] = "skip"
    workers: int | None = None              # image-check processes; null = per CPU count
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    splits: str | tuple[str, ...] = ("train", "val")      # cityscapes folders read
    masks: str = "masks"                    # mask_folder / coco_panoptic PNGs, under root
    mask_suffix: str = ""
    mask_ext: str = ".png"
    image_glob: str | tuple[str, ...] = ("*.png", "*.jpg", "*.jpeg")
    class_name: str | None = "object"       # class of ids class_map does not name
    class_map: Mapping[Any, Any] | None = None   # {mask id: class name or null}
    class_map_file: str | None = None       # json / yaml relative to root


@dataclass(frozen=True, kw_only=True)
class IngestionConfig(Schema):
    """Everything under ``ingestion:``: the train / val split of sources without one."""

    BLOCK = "ingestion"

    val_fraction: float = 0.2               # share of images sent to val
    split_seed: int = 0
