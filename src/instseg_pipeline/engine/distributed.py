"""Multi-process training: an elastic launcher (torchrun semantics) and rank helpers.

`launch(fn, nproc_per_node, *args)` starts `nproc_per_node` workers on this node through
`torch.distributed.launcher.api.elastic_launch`; each worker joins the process group
(gloo on CPU, nccl on CUDA, `env://` from the launcher's environment), runs `fn(*args)`
and leaves the group. Multi-node runs start one `launch` per node with the same
`rdzv_endpoint`, `run_id` and `nnodes`, exactly as one `torchrun` per node would; one
process per node (``nproc_per_node=1, nnodes=2``) is DDP too.

What `launch` returns is global rank 0's value on every node: rank 0 sends it to the first
worker of each other node (`_rank0_value_on_node_leaders`), so every node's caller gets the
same object (under DDP the weights agree on every rank anyway, but rank-0-only work such as
model selection and the logged history does not). A worker that fails or is killed stops
the whole run: the launcher ends the node's other workers and `launch` raises
`WorkerFailedError` naming the rank, pid and exit code or signal; a rank that waits on a
dead peer of another node gives up after ``timeout_s`` (the process group's timeout).

The helpers (`rank`, `world_size`, `is_main_process`, ...) answer for a single process too
(rank 0 of 1) so the engine calls them unconditionally.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch
from torch.nn.parallel import DistributedDataParallel

from instseg_pipeline.predict.device import local_rank  # the one reading of LOCAL_RANK

logger = logging.getLogger(__name__)

_PACKAGE = __name__.split(".")[0]  # the project's logger, configured in each worker
# what a collective raises when another rank went away (gloo's words, nccl's)
_PEER_LOST = ("closed by peer", "reset by peer", "Broken pipe", "communicator was aborted")
_NO_ERROR_FILE = "<N/A>"  # ProcessFailure's "not available" (no error file, unknown signal)


class WorkerFailedError(RuntimeError):
    """A DDP worker raised, exited with an error or was killed; the run was stopped.

    ``failures``: one dict per failed worker (global rank, local rank, pid, exit code,
    signal name or None, the worker's error message or None).
    """

    def __init__(self, message: str, failures: list[dict]):
        super().__init__(message)
        self.failures = failures


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
    timeout_s: float | None = None,
) -> Any:
    """Run `fn(*args)` in `nproc_per_node` worker processes per node; return global rank
    0's value, on every node.

    `fn` and `args` cross a process boundary: `fn` must be a module-level function and
    `args` picklable; on nodes other than rank 0's, rank 0's value crosses the network too.
    `node_rank` only matters for `rdzv_backend="static"` (as in torchrun); the c10d backend
    assigns node ranks itself. `backend` None means nccl when the workers see CUDA, gloo
    otherwise (pass "gloo" to train on CPU on a GPU machine). `timeout_s`: how long a
    collective waits for the other ranks (None: torch's default, 30 min for gloo) before it
    fails instead of hanging.
    Raises WorkerFailedError when a worker fails or is killed (the others are stopped).
    """
    config = _launch_config(nproc_per_node, nnodes, node_rank, rdzv_endpoint, rdzv_backend,
                            run_id, max_restarts, dict(rdzv_configs or {}), start_method)
    _limit_worker_threads(nproc_per_node)
    logger.info("launching %d worker(s) per node on %d node(s), rendezvous %s (%s)",
                nproc_per_node, nnodes, rdzv_endpoint, rdzv_backend)
    try:
        log_level = logging.getLogger(_PACKAGE).getEffectiveLevel()
        results = elastic_launch(config, _run_worker)(fn, backend, timeout_s, log_level,
                                                      *args)
    except ChildFailedError as exc:
        failures = describe_failures(exc)
        raise WorkerFailedError(_failure_message(failures, nproc_per_node, nnodes),
                                failures) from exc
    # the keys are the global ranks of this node's workers; the lowest is its local rank 0,
    # which holds rank 0's value (`_rank0_value_on_node_leaders`)
    return results[min(results)]


def describe_failures(exc: ChildFailedError) -> list[dict]:
    """The failed workers of `exc`, lowest global rank first (see `WorkerFailedError`)."""
    described = []
    for global_rank, failure in sorted(exc.failures.items()):
        # only an error file holds the worker's own words; without one (a signal, a hard
        # exit) torch makes a message up, and the exit code or signal says it better
        message = failure.message if failure.error_file != _NO_ERROR_FILE else None
        if isinstance(message, dict):  # a Python exception recorded by the worker
            message = message.get("message")
        signal = failure.signal_name() if failure.exitcode < 0 else None
        described.append({"rank": int(global_rank), "local_rank": int(failure.local_rank),
                          "pid": int(failure.pid), "exitcode": int(failure.exitcode),
                          "signal": signal if signal != _NO_ERROR_FILE else None,
                          "message": str(message).strip() if message else None})
    return described


def _failure_message(failures: list[dict], nproc_per_node: int, nnodes: int) -> str:
    """One clause per failed worker, e.g. `rank 1 (local rank 1, pid 123) was killed by
    SIGKILL`, with the worker's own error message when it left one."""
    parts = []
    for f in failures:
        who = f"rank {f['rank']} (local rank {f['local_rank']}, pid {f['pid']})"
        how = (f"was killed by {f['signal']}" if f["signal"]
               else f"exited with code {f['exitcode']}")
        error = f": {f['message']}" if f["message"] else ""
        if f["message"] and any(text in f["message"] for text in _PEER_LOST):
            error += (" (it lost a peer: the worker that failed first logged its error as "
                      "'[rank N] ERROR ... rank N failed')")
        parts.append(f"{who} {how}{error}")
    return (f"distributed training failed ({nnodes} node(s) x {nproc_per_node} worker(s)): "
            f"{'; '.join(parts)}; this node's other workers were stopped")


def _launch_config(nproc_per_node: int, nnodes: int, node_rank: int, rdzv_endpoint: str,
                   rdzv_backend: str, run_id: str, max_restarts: int,
                   rdzv_configs: dict[str, Any], start_method: str) -> LaunchConfig:
    """The LaunchConfig torchrun would build from the same flags."""
    if rdzv_backend == "static":
        rdzv_configs["rank"] = node_rank
    elif node_rank != 0:
        logger.warning("node_rank=%d does not set the ranks under rdzv_backend=%s (the "
                       "rendezvous assigns them)", node_rank, rdzv_backend)
    return LaunchConfig(
        min_nodes=nnodes, max_nodes=nnodes, nproc_per_node=nproc_per_node, run_id=run_id,
        rdzv_endpoint=rdzv_endpoint, rdzv_backend=rdzv_backend, rdzv_configs=rdzv_configs,
        max_restarts=max_restarts, start_method=start_method,
    )


def _limit_worker_threads(nproc_per_node: int) -> None:
    """Mirror torchrun: several workers each using every core would oversubscribe the CPU."""
    if nproc_per_node > 1 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = "1"


def _run_worker(fn: Callable[..., Any], backend: str | None, timeout_s: float | None,
                log_level: int, *args: Any) -> Any:
    """Worker entry point (module-level so spawn can pickle it): join the group, run, hand
    rank 0's value to this node's first worker, leave."""
    _worker_logging(log_level)
    init_process_group(backend, timeout_s)
    try:
        return _rank0_value_on_node_leaders(fn(*args))
    except BaseException:
        # the launcher reports one failed worker, the first it notices: often a peer that
        # lost its connection to this one. The error that started it is logged here.
        logger.exception("rank %d failed", rank())
        raise
    finally:
        dist.destroy_process_group()


def _worker_logging(level: int) -> None:
    """Send this worker's project log records to stderr, tagged with its global rank.

    A spawned worker does not inherit the launcher's logging set-up (under `kedro run` it
    gets Kedro's default one, where the project's INFO lines are dropped), so its progress
    and "resumed from ..." lines would be lost. `level` is the launcher's level for the
    package; ranks other than 0 log warnings and errors only, since their progress lines
    repeat rank 0's. The records stop here (no propagation): one line each, rank-tagged.
    """
    package = logging.getLogger(_PACKAGE)
    worker_rank = os.environ.get("RANK", "0")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s [rank {worker_rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    package.handlers = [handler]
    package.propagate = False
    package.setLevel(level if worker_rank == "0" else max(level, logging.WARNING))


def _rank0_value_on_node_leaders(value: Any) -> Any:
    """Global rank 0's `value` on every node's local rank 0, None on the other workers.

    A collective: every rank calls it. On one node rank 0 is the node's local rank 0 and
    nothing travels; with several nodes rank 0 broadcasts (pickled, over a gloo group of
    the nodes' first workers, so CUDA tensors or not, the object goes through host memory).
    Only the first worker of a node returns something, so the others' values never travel
    back to the launcher.
    """
    leaders = [r for r, local in enumerate(all_gather_objects(local_rank())) if local == 0]
    if leaders != [0]:
        group = dist.new_group(leaders, backend="gloo")  # every rank must call new_group
        if rank() in leaders:
            box = [value if rank() == 0 else None]
            dist.broadcast_object_list(box, src=0, group=group)
            value = box[0]
    return value if local_rank() == 0 else None


def init_process_group(backend: str | None = None, timeout_s: float | None = None) -> None:
    """Join the process group described by the launcher's environment (env://).

    backend: None picks nccl when CUDA is available, gloo otherwise. On CUDA the worker's
    current device becomes `cuda:LOCAL_RANK` first, as nccl expects.
    timeout_s: how long collectives wait for the other ranks (None: torch's default).
    """
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    timeout = timedelta(seconds=timeout_s) if timeout_s else None
    dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
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
