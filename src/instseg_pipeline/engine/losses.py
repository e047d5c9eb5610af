"""Loss arithmetic shared by the step loop and validation.

A detection model in train mode maps ``(images, targets)`` to a dict of scalar losses; the
engine weighs them (`weighted_loss`), records them as floats (`loss_values`) and averages
them over a validation loader (`validation_loss`).
"""
from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from instseg_pipeline.engine import distributed
from instseg_pipeline.engine.rng import rng_preserved


def move_batch(images: Sequence[torch.Tensor], targets: Sequence[dict],
               device: torch.device) -> tuple[list[torch.Tensor], list[dict]]:
    """Images (float [3, H, W]) and the tensor entries of targets moved to `device`."""
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                for k, v in t.items()} for t in targets]
    return images, targets


def weighted_loss(loss_dict: dict[str, torch.Tensor],
                  weights: Mapping[str, float]) -> torch.Tensor:
    """Sum of `weights[name] * loss` (weight 1.0 for losses `weights` does not name)."""
    return sum(float(weights.get(k, 1.0)) * v for k, v in loss_dict.items())


def loss_values(loss_dict: dict[str, torch.Tensor],
                weights: Mapping[str, float]) -> dict[str, float]:
    """{'loss': weighted total, **components} as Python floats."""
    values = {"loss": float(weighted_loss(loss_dict, weights).detach())}
    values.update({k: float(v.detach()) for k, v in loss_dict.items()})
    return values


def image_ids(targets: Sequence[dict]) -> list:
    """The `image_id` of each target as plain ints (None where a target has none)."""
    ids = [t.get("image_id") for t in targets]
    return [int(i) if torch.is_tensor(i) and i.numel() == 1 else i for i in ids]


def validation_loss(model: nn.Module, loader: Iterable, device: torch.device,
                    loss_weights: Mapping[str, float], amp: bool = False) -> dict[str, float]:
    """Mean weighted loss and mean components over `loader` (averaged over ranks under DDP).

    torchvision detectors return losses only in train mode, so the model runs in train mode
    under no_grad, with BatchNorm layers in eval mode so validation leaves their running
    statistics untouched. Proposal sampling in train mode is random: the global RNG state
    is saved and restored around it so validation does not change the training run.
    """
    sums: dict[str, float] = collections.defaultdict(float)
    batches = 0
    with _bn_frozen(model), rng_preserved(), torch.no_grad():
        for images, targets in loader:
            images, targets = move_batch(images, targets, device)
            with torch.autocast(device_type=device.type, enabled=amp):
                loss_dict = model(images, targets)
            for name, value in loss_values(loss_dict, loss_weights).items():
                sums[name] += value
            batches += 1
    return _mean_over_ranks(sums, batches, device)


@contextmanager
def _bn_frozen(model: nn.Module) -> Iterator[None]:
    """Train mode except BatchNorm layers, which use and keep their running statistics."""
    was_training = model.training
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _mean_over_ranks(sums: dict[str, float], count: int, device: torch.device) -> dict[str, float]:
    names = sorted(sums)
    totals = torch.tensor([sums[n] for n in names] + [float(count)], dtype=torch.float64,
                          device=device)
    totals = distributed.all_reduce_sum(totals).tolist()
    return {n: v / max(totals[-1], 1.0) for n, v in zip(names, totals[:-1], strict=True)}
