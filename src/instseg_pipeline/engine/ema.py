"""An exponential moving average (EMA) of the model weights (``training.ema``).

`ModelEMA` keeps a copy of the model whose weights follow the trained ones after every
optimizer step::

    d_t = decay * (1 - exp(-t / warmup_iters))      t = updates done, this one included
    ema = d_t * ema + (1 - d_t) * live

so the first averages follow the live weights closely instead of holding on to the random
initialisation (``warmup_iters`` 0: ``d_t = decay`` from the start). Floating-point
parameters and buffers (BatchNorm running statistics) are averaged; other buffers
(``num_batches_tracked``) are copied. The copy is what in-training validation and model
selection evaluate and what `train` returns as the trained weights; its state (weights and
update count) is part of each checkpoint, so a resumed run continues the same average.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


class ModelEMA:
    """The averaged copy of a model.

    model: the (unwrapped) model to follow; the copy starts from its current weights, on
        its device, in eval mode, without gradients.
    decay: the target decay, 0 < decay < 1.
    warmup_iters: the ramp's time constant in updates (0: no ramp).
    ``module`` is the averaged `nn.Module` (evaluate it like the model), ``updates`` the
    number of updates done.
    """

    def __init__(self, model: nn.Module, decay: float, warmup_iters: int = 0):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        if warmup_iters < 0:
            raise ValueError(f"EMA warmup_iters must be >= 0, got {warmup_iters}")
        self.decay, self.warmup_iters = float(decay), int(warmup_iters)
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)
        self.updates = 0

    def decay_at(self, updates: int) -> float:
        """The decay d_t of update number ``updates`` (1 for the first)."""
        if not self.warmup_iters:
            return self.decay
        return self.decay * (1.0 - math.exp(-updates / self.warmup_iters))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights (the unwrapped model, with
        the state_dict keys of the one the EMA was built from)."""
        self.updates += 1
        weight = 1.0 - self.decay_at(self.updates)
        live = model.state_dict()
        for name, ema in self.module.state_dict().items():
            value = live[name].detach()
            if ema.is_floating_point():
                # lerp leaves an entry that equals the live one (a frozen layer) bit-exact
                ema.lerp_(value.to(ema.dtype), weight)
            else:
                ema.copy_(value)

    def reset(self, model: nn.Module) -> None:
        """Start the average again from ``model``'s current weights (no updates done)."""
        self.module.load_state_dict(model.state_dict())
        self.updates = 0

    def state_dict(self) -> dict[str, Any]:
        """``{"weights": the averaged state_dict, "updates": int, "decay": float,
        "warmup_iters": int}`` (loads with torch.load(weights_only=True))."""
        return {"weights": self.module.state_dict(), "updates": self.updates,
                "decay": self.decay, "warmup_iters": self.warmup_iters}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the average of `state_dict()`'s output: its weights and update count
        (the decay and ramp stay this object's, i.e. the current configuration's)."""
        self.module.load_state_dict(state["weights"])
        self.updates = int(state["updates"])
