"""The global RNG states a training run depends on: seed them, capture them, restore them.

Checkpoints carry every rank's captured state so a resumed run draws exactly what the
interrupted one would have (dropout, proposal sampling, augmentation built on the globals).
"""
from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed python, numpy's global RNG and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng() -> dict:
    """Python, numpy (legacy global), torch CPU and CUDA RNG states in weights_only types."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Inverse of `capture_rng` (CUDA states only when this process has CUDA)."""
    random.setstate(_as_tuples(state["python"]))
    name, key, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def rng_preserved() -> Iterator[None]:
    """Run the block without changing the global RNG states (for work outside the run)."""
    state = capture_rng()
    try:
        yield
    finally:
        restore_rng(state)


def _as_tuples(value: Any) -> Any:
    """random.setstate needs tuples where a serialiser may have produced lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
