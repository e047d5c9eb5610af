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
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from instseg_pipeline.config_schema import ConfigError, Schema
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


PSEUDO_MASK_METHODS = ("box", "grabcut", "sam")


@dataclass(frozen=True, kw_only=True)
class PseudoMaskConfig:
    """How box-only annotations get their masks (`data.pseudo_masks`); ``source.pseudo_masks``.

    workers: processes for `generate` (null: one per CPU, 0: none; ``sam`` always runs in
    the calling process).
    """

    method: Literal["box", "grabcut", "sam"]
    grabcut_iterations: int = 5
    grabcut_margin: int = 2                 # px of certain background kept around the box
    min_fill: float = 0.1                   # share of the box a pseudo-mask must cover ...
    max_fill: float = 0.98                  # ... and may cover at most; else the box
    sam_checkpoint: str | None = None
    sam_model_type: str = "vit_b"
    workers: int | None = None
    seed: int = 0

    def __post_init__(self):
        if self.method not in PSEUDO_MASK_METHODS:
            raise ConfigError("method", f"expected one of {', '.join(PSEUDO_MASK_METHODS)}, "
                                        f"got {self.method!r}")
        if self.method == "sam" and not self.sam_checkpoint:
            raise ConfigError("sam_checkpoint", "required with method 'sam': the path of a "
                                                "SAM checkpoint (official vit_b / vit_l / "
                                                "vit_h weights or {config, state_dict})")
        if self.grabcut_iterations < 1:
            raise ConfigError("grabcut_iterations",
                              f"must be at least 1, got {self.grabcut_iterations}")
        if self.grabcut_margin < 0:
            raise ConfigError("grabcut_margin", f"must be >= 0, got {self.grabcut_margin}")
        if not 0.0 <= self.min_fill < self.max_fill <= 1.0:
            raise ConfigError("min_fill", f"need 0 <= min_fill < max_fill <= 1, got "
                                          f"min_fill {self.min_fill}, max_fill {self.max_fill}")
        if self.workers is not None and self.workers < 0:
            raise ConfigError("workers", f"must be >= 0 or null, got {self.workers}")


@dataclass(frozen=True, kw_only=True)
class SourceConfig(Schema):
    """Everything under ``source:``; which reader runs and where it reads.

    Every source: type, root, split, verify_images, max_image_pixels, on_invalid, workers.
    coco: annotations, images, pseudo_masks (masks of box-only annotations; null: such
    annotations fail the read, `data.pseudo_masks`). coco_panoptic: annotations (the panoptic json), masks (its PNG
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
    pseudo_masks: PseudoMaskConfig | None = None   # coco: box-only annotations' masks


@dataclass(frozen=True, kw_only=True)
class BoxOnlyConfig(PseudoMaskConfig):
    """``ingestion.box_only``: simulated box-only data. After the split, ``fraction`` of the
    train images (a choice seeded by ``seed``) get pseudo-masks from their boxes instead of
    their masks (`data.pseudo_masks.replace_with_pseudo_masks`); 0 leaves the tables as
    they are. The other keys are `PseudoMaskConfig`'s."""

    fraction: float = 0.0
    method: Literal["box", "grabcut", "sam"] = "grabcut"

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.fraction <= 1.0:
            raise ConfigError("fraction", f"must lie in [0, 1], got {self.fraction}")

    def pseudo_masks(self) -> PseudoMaskConfig:
        """The pseudo-mask settings alone."""
        return PseudoMaskConfig(**{f.name: getattr(self, f.name)
                                   for f in fields(PseudoMaskConfig)})


@dataclass(frozen=True, kw_only=True)
class IngestionConfig(Schema):
    """Everything under ``ingestion:``: the train / val split of sources without one, and
    the simulated box-only share of the train images."""

    BLOCK = "ingestion"

    val_fraction: float = 0.2               # share of images sent to val
    split_seed: int = 0
    box_only: BoxOnlyConfig = field(default_factory=BoxOnlyConfig)
