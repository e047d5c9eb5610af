"""The ``model_comparison`` parameters block as a typed, frozen config
(conf/base/parameters_model_comparison.yml); built once in the comparison node.

Defaults equal the base YAML's values. No torch, no Kedro here.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from instseg_pipeline.config_schema import ConfigError, Schema

# training keys that make the budget: every compared model shares them, so an override
# of one would compare budgets instead of families
SHARED_BUDGET = ("max_iters", "batch_size", "scheduler", "warmup_iters", "warmup_factor",
                 "seed", "multiscale", "augmentation", "selection", "checkpoint_dir",
                 "distributed")


@dataclass(frozen=True, kw_only=True)
class SpeedConfig:
    """Inference speed at batch 1 on val images, eager torch and ONNX Runtime alike."""

    images: int = 8                         # val images timed (distinct sizes first)
    warmup: int = 2                         # untimed runs of the first image, per backend
    repeats: int = 1                        # timed passes over the images, per backend
    threads: int = 1                        # torch threads = onnxruntime intra-op threads
    onnx: bool = True                       # also time ONNX Runtime where the family exports

    def __post_init__(self):
        for name, low in (("images", 1), ("warmup", 0), ("repeats", 1), ("threads", 1)):
            if getattr(self, name) < low:
                raise ConfigError(name, f"must be >= {low}, got {getattr(self, name)}")


@dataclass(frozen=True, kw_only=True)
class ModelComparisonConfig(Schema):
    """Everything under ``model_comparison:``."""

    BLOCK = "model_comparison"

    models: tuple[str, ...] = ("maskrcnn_tiny", "yolact_tiny", "solov2_tiny", "simpleseg_tiny")
    # per model name: ``training`` keys on top of params:training for that model only; the
    # one-stage families' optimizer and small-image settings (the YAML says why)
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: {
        "yolact_tiny": {"optimizer": {"name": "adamw", "lr": 0.002}},
        "solov2_tiny": {"optimizer": {"name": "adamw", "lr": 0.0015},
                        "model": {"mask_loss_stride": 1}},
        "simpleseg_tiny": {"optimizer": {"name": "adamw", "lr": 0.004},
                           "model": {"offset_weight": 0.1}}})
    speed: SpeedConfig = field(default_factory=SpeedConfig)

    def __post_init__(self):
        if not self.models:
            raise ConfigError("models", "name at least one model")
        repeated = sorted({m for m in self.models if self.models.count(m) > 1})
        if repeated:
            raise ConfigError("models", f"{repeated[0]!r} is listed twice")
        # an override of a model not compared is kept for when it is (the defaults name
        # every tiny family); `compare.check_models` refuses names no family registers
        for name, override in self.overrides.items():
            shared = [key for key in override if key in SHARED_BUDGET]
            if shared:
                raise ConfigError(f"overrides.{name}.{shared[0]}", "shared by every compared "
                                  "model (the same budget); set it under training")
