"""The global RNG states a training run depends on, and the settings that make it repeatable.

Checkpoints carry every rank's captured state so a resumed run draws exactly what the
interrupted one would have (dropout, proposal sampling, augmentation built on the globals).

`reproducible(deterministic, threads, device_type)` is the block a training run executes in:
a fixed intra-op thread count, and with ``deterministic`` torch's deterministic algorithms
(cuDNN's too, and cuBLAS' fixed workspace on CUDA), all restored afterwards so work outside
the run (evaluation in the same Kedro session) keeps its settings. `state_dict_sha256` is
the fingerprint two runs compare.
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

# cuBLAS is deterministic only with a fixed workspace; torch's docs name these two values.
CUBLAS_WORKSPACE_CONFIGS = (":4096:8", ":16:8")


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


@dataclass(frozen=True)
class _TorchSettings:
    """The process-wide torch settings `reproducible` changes, to put them back."""

    threads: int
    deterministic: bool
    warn_only: bool
    cudnn_deterministic: bool
    cudnn_benchmark: bool

    @classmethod
    def current(cls) -> _TorchSettings:
        return cls(threads=torch.get_num_threads(),
                   deterministic=torch.are_deterministic_algorithms_enabled(),
                   warn_only=torch.is_deterministic_algorithms_warn_only_enabled(),
                   cudnn_deterministic=torch.backends.cudnn.deterministic,
                   cudnn_benchmark=torch.backends.cudnn.benchmark)

    def apply(self) -> None:
        torch.set_num_threads(self.threads)
        torch.use_deterministic_algorithms(self.deterministic, warn_only=self.warn_only)
        torch.backends.cudnn.deterministic = self.cudnn_deterministic
        torch.backends.cudnn.benchmark = self.cudnn_benchmark


@contextmanager
def reproducible(deterministic: bool, threads: int | None = None,
                 device_type: str = "cpu") -> Iterator[int]:
    """Run the block with ``threads`` intra-op CPU threads and, when ``deterministic``, with
    deterministic kernels only; yields the thread count used. Every setting is restored on
    exit.

    threads: None keeps this process's count (torch's default: the cores it may use, or
        OMP_NUM_THREADS). The count is fixed for the whole block either way, because CPU
        kernels split their reductions by thread: another count gives other float bits.
    deterministic: `torch.use_deterministic_algorithms(True)`, cuDNN deterministic and not
        benchmarking. On CPU an op without a deterministic implementation raises (a run
        that cannot be repeated bit for bit says so); on CUDA it warns instead, since some
        CUDA backward kernels have none and a default-config GPU run must not fail for it.
    """
    previous = _TorchSettings.current()
    count = int(threads) if threads else previous.threads
    wanted = _TorchSettings(
        threads=count, deterministic=deterministic or previous.deterministic,
        warn_only=device_type == "cuda" if deterministic else previous.warn_only,
        cudnn_deterministic=deterministic or previous.cudnn_deterministic,
        cudnn_benchmark=previous.cudnn_benchmark and not deterministic)
    if deterministic and device_type == "cuda":
        _fix_cublas_workspace()
    wanted.apply()
    logger.info("training with %d CPU thread(s), deterministic algorithms %s", count,
                "on" if wanted.deterministic else "off")
    try:
        yield count
    finally:
        previous.apply()


def _fix_cublas_workspace() -> None:
    """Set CUBLAS_WORKSPACE_CONFIG unless the user chose a deterministic value already.

    cuBLAS reads it when its handle is created: effective when nothing in this process
    multiplied matrices on the GPU yet (the training process, or a fresh DDP worker).
    """
    current = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if current in CUBLAS_WORKSPACE_CONFIGS:
        return
    if current:
        logger.warning("CUBLAS_WORKSPACE_CONFIG=%s is not deterministic; using %s", current,
                       CUBLAS_WORKSPACE_CONFIGS[0])
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE_CONFIGS[0]


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 hex digest over ``state_dict`` in sorted key order.

    Each entry contributes its name, dtype, shape and raw bytes (CPU, contiguous), so two
    state_dicts share a digest exactly when they are bit-identical.
    """
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
