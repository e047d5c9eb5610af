"""The ``weak_supervision`` parameters block as a typed, frozen config
(conf/base/parameters_weak_supervision.yml); built once in each node of the
``weak_supervision`` pipeline.

Defaults equal the base YAML's values. No torch, no Kedro here.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from instseg_pipeline.config_schema import ConfigError, Schema, build
from instseg_pipeline.data.config import PseudoMaskConfig

Method = Literal["box", "grabcut", "sam"]
Variant = Literal["full", "box", "grabcut", "mixed"]
VARIANTS: tuple[str, ...] = ("full", "box", "grabcut", "mixed")


@dataclass(frozen=True, kw_only=True)
class BudgetConfig:
    """The training budget every variant shares; null takes ``params:training``'s value.

    ``max_iters`` alone: that many steps. ``time_budget_min``: minutes of steps, with
    ``max_iters`` as a cap (`engine.loop`).
    """

    max_iters: int | None = None
    time_budget_min: float | None = None

    def __post_init__(self):
        if self.max_iters is not None and self.max_iters < 1:
            raise ConfigError("max_iters", f"must be >= 1 or null, got {self.max_iters}")
        if self.time_budget_min is not None and not self.time_budget_min > 0:
            raise ConfigError("time_budget_min",
                              f"must be > 0 minutes or null, got {self.time_budget_min}")


@dataclass(frozen=True, kw_only=True)
class WeakSupervisionConfig(Schema):
    """Everything under ``weak_supervision:``."""

    BLOCK = "weak_supervision"

    # pseudo_mask_quality
    methods: tuple[Method, ...] | None = None   # null: box, grabcut (+ sam with a checkpoint)
    max_instances: int | None = 500             # sampled annotated instances; null = all
    seed: int = 0                               # the sample
    # PseudoMaskConfig keys but `method` (grabcut_iterations, min_fill, workers, ...)
    pseudo_masks: Mapping[str, Any] = field(default_factory=dict)
    # weak_supervision_comparison
    variants: tuple[Variant, ...] = VARIANTS
    mixed_full_fraction: float = 0.1            # train images keeping their masks in `mixed`
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    pseudo_mask_loss_weight: float | None = None    # null: training.pseudo_mask_loss_weight

    def __post_init__(self):
        if self.max_instances is not None and self.max_instances < 1:
            raise ConfigError("max_instances", f"must be >= 1 or null, got {self.max_instances}")
        if self.methods is not None and not self.methods:
            raise ConfigError("methods", "name at least one method, or null for the defaults")
        for name, values in (("methods", self.methods or ()), ("variants", self.variants)):
            repeated = sorted({v for v in values if values.count(v) > 1})
            if repeated:
                raise ConfigError(name, f"{repeated[0]!r} is listed twice")
        if not self.variants:
            raise ConfigError("variants", "name at least one variant")
        if not 0.0 < self.mixed_full_fraction < 1.0:
            raise ConfigError("mixed_full_fraction",
                              f"must be in (0, 1), got {self.mixed_full_fraction}")
        weight = self.pseudo_mask_loss_weight
        if weight is not None and not 0.0 <= weight <= 1.0:
            raise ConfigError("pseudo_mask_loss_weight", f"must be in [0, 1] or null, got {weight}")
        if "method" in self.pseudo_masks:
            raise ConfigError("pseudo_masks.method", "set by `methods` (quality) and the "
                              "variants (comparison), not here")
        for method in dict.fromkeys(("box", "grabcut", *(self.methods or ()))):
            self.pseudo_mask_config(method)  # a bad key, or sam without a checkpoint, fails

    def pseudo_mask_config(self, method: str) -> PseudoMaskConfig:
        """The `data.config.PseudoMaskConfig` of ``method`` with this block's
        ``pseudo_masks`` settings; ConfigError names a bad key under
        ``pseudo_masks`` (the path is prefixed by `build`)."""
        return build(PseudoMaskConfig, {**self.pseudo_masks, "method": method}, "pseudo_masks")

    def quality_methods(self) -> tuple[str, ...]:
        """The methods `pseudo_mask_quality` measures: ``methods``, or box and grabcut
        (and sam when ``pseudo_masks.sam_checkpoint`` is set)."""
        if self.methods is not None:
            return self.methods
        return ("box", "grabcut") + (("sam",) if self.pseudo_masks.get("sam_checkpoint")
                                     else ())
