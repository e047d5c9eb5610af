"""The ``training`` parameters block as a typed, frozen config (conf/base/parameters_training.yml).

`TrainingConfig.from_params(params)` is built once, in the training nodes; `fit`, the loop and
its callbacks read attributes. Every default here equals the base YAML's value (a test keeps
them equal), so a run from the YAML and a run from a partial dict in a test differ only where
they say so. ``model`` and ``families`` stay open mappings: the models registry checks their
keys, as each family accepts its own. ``loss_weights`` is open too: families name their
losses (empty: every loss weighs 1.0 on top of the family's own weights).
No torch here: the training nodes import this module at load time, and every ``kedro run``
(ingestion too) loads all nodes modules.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from instseg_pipeline.config_schema import ConfigError, Schema

MASK_RCNN_LOSSES = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness",
                    "loss_rpn_box_reg")


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """SGD (with momentum) or AdamW (momentum unused) over the trainable parameters."""

    name: Literal["sgd", "adamw"] = "adamw"
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 0.0001


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    """Per-iteration lr factor after warmup.

    multistep: ``gamma`` at each milestone (iterations); cosine: half cosine to 0 at
    max_iters; constant: 1.
    """

    name: Literal["multistep", "cosine", "constant"] = "cosine"
    milestones: tuple[int, ...] = (600, 730)
    gamma: float = 0.1


@dataclass(frozen=True, kw_only=True)
class EmaConfig:
    """Exponential moving average of the weights (`engine.ema.ModelEMA`); decay null or 0 =
    off. When on, validation, model selection and the trained model use the average.

    Decay per optimizer step t: ``decay * (1 - exp(-t / warmup_iters))`` (0: no ramp).
    """

    decay: float | None = None
    warmup_iters: int = 100

    def __post_init__(self):
        if self.decay is not None and not 0.0 <= self.decay < 1.0:
            raise ConfigError("decay", f"must be in [0, 1) or null, got {self.decay}")
        if self.warmup_iters < 0:
            raise ConfigError("warmup_iters", f"must be >= 0, got {self.warmup_iters}")


@dataclass(frozen=True, kw_only=True)
class AugmentationConfig:
    """Training augmentation (`torchdata.augment.build_augmentation`).

    ``transforms`` (albumentations specs ``{name: ..., **kwargs}``, nested ``transforms`` for
    OneOf) replaces the preset; the builder checks their names and arguments.
    """

    preset: Literal["none", "light", "strong"] = "light"
    size: tuple[int, int] | None = None     # [height, width] of the crop in `strong`
    min_visibility: float = 0.0             # drop instances with less of their box left
    transforms: tuple[Mapping[str, Any], ...] | None = None


@dataclass(frozen=True, kw_only=True)
class DistributedConfig:
    """DDP workers through the elastic launcher (torchrun semantics).

    World size nnodes x nproc_per_node; 1 = this process, above 1 = DDP (one process per
    node too). node_rank: this node's index, 0..nnodes-1; it sets the ranks under the
    static rendezvous, and under any backend node_rank 0 is the node that tracks in MLflow.
    """

    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_backend: str = "c10d"
    rdzv_endpoint: str = "127.0.0.1:29500"
    run_id: str = "instseg"
    max_restarts: int = 0
    timeout_s: float = 1800.0               # a collective waiting on a dead rank fails after it

    def __post_init__(self):
        for name, low in (("nproc_per_node", 1), ("nnodes", 1), ("max_restarts", 0)):
            if getattr(self, name) < low:
                raise ConfigError(name, f"must be >= {low}, got {getattr(self, name)}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigError("node_rank", f"must be in 0..{self.nnodes - 1} (nnodes="
                              f"{self.nnodes}), got {self.node_rank}")
        if self.timeout_s <= 0:
            raise ConfigError("timeout_s", f"must be > 0, got {self.timeout_s}")


@dataclass(frozen=True, kw_only=True)
class SelectionConfig:
    """Model selection: AP on a val subset every ``every_epochs`` epochs (0 = off)."""

    every_epochs: int = 6
    max_images: int | None = 16             # null = every val image
    iou_type: Literal["segm", "bbox"] = "segm"


@dataclass(frozen=True, kw_only=True)
class TrainingConfig(Schema):
    """Everything under ``training:``; the comments say what each key means."""

    BLOCK = "training"

    # data and run
    seed: int = 0                           # python, numpy, torch (+ rank under DDP), data order
    device: Literal["auto", "cpu", "cuda"] = "auto"   # auto: CUDA when present
    threads: int | None = None              # torch CPU threads; null = torch's default
    deterministic: bool = True              # bit-identical weights in a fresh process, same
                                            # machine, threads and libraries (engine/rng.py)
    batch_size: int = 4
    num_workers: int = 0
    group_aspect_ratio: bool = True         # batches of similar aspect ratio
    multiscale: tuple[int, ...] = ()        # shorter sides drawn per iteration
    val_max_images: int | None = 8          # validation loss on at most this many (0/null: all)
    preview_samples: int = 8
    checkpoint_dir: str                     # no default: the YAML names one per source
    resume: str = "none"                    # none | auto | path/to/ckpt.pt
    log_model_to_mlflow: bool = True
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    model: Mapping[str, Any] = field(default_factory=dict)  # checked by the models registry
    # per family block (maskrcnn, yolact, ...): its settings, under training.model's overrides
    families: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # the loop
    max_iters: int = 800                    # optimizer steps in all
    time_budget_min: float | None = None    # also stop after this many minutes of steps;
                                            # the schedule follows the elapsed share
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    warmup_iters: int = 50                  # linear from warmup_factor * lr to lr
    warmup_factor: float = 0.01
    clip_grad_norm: float | None = 10.0     # max total L2 norm; null or 0 = off
    ema: EmaConfig = field(default_factory=EmaConfig)   # weight averaging; off by default
    loss_weights: Mapping[str, float] = field(default_factory=dict)  # unnamed weigh 1.0
    pseudo_mask_loss_weight: float = 1.0    # mask-loss weight of instances whose mask_source
                                            # is not `annotated` (grabcut, box, sam), in [0, 1]
    amp: Literal["auto"] | bool = "auto"    # auto = on for CUDA; never on CPU
    on_nonfinite: Literal["error", "skip"] = "error"
    log_every: int | None = 20              # iterations between log lines; 0/null = none
    checkpoint_every: int | None = 100      # iterations; 0/null = epoch ends only
    keep_checkpoints: int | None = 3        # newest kept; 0/null = all
    progress_bar: bool = True
    tensorboard: bool = False               # scalars and val predictions for TensorBoard
    tensorboard_dir: str = "data/09_tracking/tensorboard"   # + /<MLflow run id or time>
    tensorboard_every: int = 100            # iterations between val prediction images
    tensorboard_images: int = 4             # fixed val images drawn with their predictions
    find_unused_parameters: bool = False    # DDP option for models with unused branches
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)

    def __post_init__(self):
        if self.max_iters < 1:
            raise ConfigError("max_iters", f"must be >= 1, got {self.max_iters}")
        if self.batch_size < 1:
            raise ConfigError("batch_size", f"must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.pseudo_mask_loss_weight <= 1.0:
            raise ConfigError("pseudo_mask_loss_weight",
                              "must be in [0, 1] (a pseudo-mask counts at most as much as an "
                              f"annotated one), got {self.pseudo_mask_loss_weight}")
        if self.time_budget_min is not None and not self.time_budget_min > 0:
            raise ConfigError("time_budget_min",
                              f"must be > 0 minutes or null, got {self.time_budget_min}")
