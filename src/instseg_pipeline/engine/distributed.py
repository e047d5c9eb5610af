"""Multi-process training: an elastic launcher (torchrun semantics) and rank helpers.

`launch(fn, nproc_per_node, *args)` starts `nproc_per_node` workers on this node through
`torch.distributed.launcher.api.elastic_launch`; each worker joins the process group
(gloo on CPU, nccl on CUDA, `env://` from the launcher's environment), runs `fn(*args)`
and leaves the group. Multi-node runs start one `launch` per node with the same
`rdzv_endpoint`, `run_id` and `nnodes`, exactly as one `torchrun` per node would.

The helpers (`rank`, `world_size`, `is_main_process`, ...) answer for a single process too
(rank 0 of 1) so the engine calls them unconditionally.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.launcher.api import LaunchConfig, elastic_launch
from torch.nn.parallel import DistributedDataParallel

logger = logging.getLogger(__name__)


def launch(
    fn: Callable[..., Any],
    nproc_per_node: int,
    *args: Any,
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str = "127.0.0.1:29500",
    rdzv_backend: str = "c10d",
    run_id: str = "instseg",
    max_restarts: int = 0,
    rdzv_configs: dict[str, Any] | None = None,
    start_method: str = "spawn",
    backend: str | None = None,
) -> Any:
    """Run `fn(*args)` in `nproc_per_node` worker processes per node; return rank 0's value.

    `fn` and `args` cross a process boundary: `fn` must be a module-level function and
    `args` picklable. `node_rank` only matters for `rdzv_backend="static"` (as in torchrun);
    the c10d backend assigns node ranks itself. `backend` None means nccl when the workers
    see CUDA, gloo otherwise (pass "gloo" to train on CPU on a GPU machine). On a node
    that does not host global rank 0 the return value is None. A failing worker raises
    `torch.distributed.elastic.multiprocessing.errors.ChildFailedError`.
    """
    config = _launch_config(nproc_per_node, nnodes, node_rank, rdzv_endpoint, rdzv_backend,
                            run_id, max_restarts, dict(rdzv_configs or {}), start_method)
    _limit_worker_threads(nproc_per_node)
    logger.info("launching %d worker(s) per node on %d node(s), rendezvous %s (%s)",
                nproc_per_node, nnodes, rdzv_endpoint, rdzv_backend)
    results = elastic_launch(config, _run_worker)(fn, backend, *args)
    return results.get(0)


def _launch_config(nproc_per_node: int, nnodes: int, node_rank: int, rdzv_endpoint: str,
                   rdzv_backend: str, run_id: str, max_restarts: int,
                   rdzv_configs: dict[str, Any], start_method: str) -> LaunchConfig:
    """The LaunchConfig torchrun would build from the same flags."""
    if rdzv_backend == "static":
        rdzv_configs["rank"] = node_rank
    elif node_rank != 0:
        logger.warning("node_rank=%d is ignored by rdzv_backend=%s (it assigns ranks itself)",
                       node_rank, rdzv_backend)
    return LaunchConfig(
        min_nodes=nnodes, max_nodes=nnodes, nproc_per_node=nproc_per_node, run_id=run_id,
        rdzv_endpoint=rdzv_endpoint, rdzv_backend=rdzv_backend, rdzv_configs=rdzv_configs,
        max_restarts=max_restarts, start_method=start_method,
    )


def _limit_worker_threads(nproc_per_node: int) -> None:
    """Mirror torchrun: several workers each using every core would oversubscribe the CPU."""
    if nproc_per_node > 1 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = "1"


def _run_worker(fn: Callable[..., Any], backend: str | None, *args: Any) -> Any:
    """Worker entry point (module-level so spawn can pickle it): join the group, run, leave."""
    init_process_group(backend)
    try:
        return fn(*args)
    finally:
        dist.destroy_process_group()


def init_process_group(backend: str | None = None) -> None:
    """Join the process group described by the launcher's environment (env://).

    backend: None picks nccl when CUDA is available, gloo otherwise. On CUDA the worker's
    current device becomes `cuda:LOCAL_RANK` first, as nccl expects.
    """
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend, init_method="env://")
    logger.debug("rank %d/%d joined the %s process group", rank(), world_size(), backend)


def is_distributed() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank of this process (0 outside a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes in the group (1 outside a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """Rank on this node, from the launcher's LOCAL_RANK (0 when absent)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """Rank 0: the process that writes checkpoints and shows progress."""
    return rank() == 0


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def barrier() -> None:
    """Wait for every rank; a no-op in a single process."""
    if is_distributed():
        dist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` in rank order (a one-element list in a single process)."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of `values` over ranks (unchanged in a single process).

    values: float Tensor[K] on the device the backend serves (CUDA for nccl).
    """
    if is_distributed():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_true(flag: bool, device: torch.device) -> bool:
    """True when `flag` is True on every rank (so all ranks take the same branch)."""
    if not is_distributed():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() == 1.0)
