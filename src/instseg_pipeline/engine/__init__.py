"""The training loop: device, AMP, warmup and schedules, clipping, checkpoints, resume, DDP.

`train(model, make_loader, config, checkpoint_dir=..., model_config=...)` runs
`config["max_iters"]` optimizer steps of a torchvision-style detection model (in train mode,
`model(images, targets)` returns a dict of scalar losses). It takes objects, not paths:

- `make_loader(epoch)` returns an iterable of `(images, targets)` batches, with
  `images: list[float Tensor[3, H, W]]` and `targets: list[dict]` (torchvision keys; an
  `image_id` entry names the image in error messages). It must give the same batches in the
  same order every time it is called with the same epoch, without drawing from the global
  RNGs (give samplers their own `torch.Generator` seeded from the epoch): resume skips the
  batches the interrupted run already consumed and relies on that order. `len()` is the
  number of batches per epoch.
- Under DDP each rank's `make_loader` yields that rank's shard, the same number of batches
  on every rank.

Checkpoints `ckpt_<iteration:08d>.pt` (iteration = optimizer steps done) are written
atomically by rank 0 every `checkpoint_every` iterations, at each epoch end and at the
end; only the newest `keep_checkpoints` stay. They load with `torch.load(weights_only=True)`.
Configuration keys and defaults: see `DEFAULT_CONFIG`.
"""

from __future__ import annotations

import collections
import copy
import itertools
import logging
import math
import os
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from instseg_pipeline.engine import distributed

logger = logging.getLogger(__name__)

MASK_RCNN_LOSSES = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness",
                    "loss_rpn_box_reg")

DEFAULT_CONFIG: dict[str, Any] = {
    "max_iters": 1000,            # optimizer steps in all; epochs follow from len(loader)
    "optimizer": {"name": "sgd", "lr": 0.02, "momentum": 0.9, "weight_decay": 1e-4},
    # milestones in iterations; cosine decays to 0 at max_iters; constant keeps lr
    "scheduler": {"name": "multistep", "milestones": [], "gamma": 0.1},
    "warmup_iters": 100,          # linear from warmup_factor * lr at 0 to lr at warmup_iters
    "warmup_factor": 0.001,
    "clip_grad_norm": None,       # max total L2 norm of the gradients; None or 0 = off
    "loss_weights": {name: 1.0 for name in MASK_RCNN_LOSSES},  # unnamed losses weigh 1.0
    "device": "auto",             # auto (CUDA when available) | cpu | cuda
    "amp": "auto",                # auto = on for CUDA; never on CPU
    "seed": 0,                    # seeds python, numpy and torch RNGs (+ rank under DDP)
    "on_nonfinite": "error",      # error: raise NonFiniteLossError | skip: skip the step
    "log_every": 20,              # iterations between log lines; 0/None = none
    "checkpoint_every": 500,      # iterations between checkpoints; 0/None = epoch ends only
    "keep_checkpoints": 3,
    "progress_bar": True,
    "find_unused_parameters": False,  # DDP option for models with branches left unused
}
_ENUMS = {"device": ("auto", "cpu", "cuda"), "on_nonfinite": ("error", "skip"),
          "amp": ("auto", True, False)}
_OPTIMIZERS = ("sgd", "adamw")
_SCHEDULERS = ("multistep", "cosine", "constant")
_CKPT_NAME = re.compile(r"^ckpt_(\d{8})\.pt$")
_CKPT_KEYS = ("model", "optimizer", "scheduler", "scaler", "epoch", "iteration",
              "batch_in_epoch", "rng", "model_config", "history", "config")
# initialisation-only fields: resuming overwrites the weights, so they may differ
_RESUME_IGNORED_FIELDS = ("weights", "weights_backbone", "pretrained")

Callback = Callable[[str, dict], None]


class NonFiniteLossError(RuntimeError):
    """A loss was NaN or infinite; carries `iteration`, `image_ids` and `losses`."""

    def __init__(self, iteration: int, image_ids: list, losses: dict[str, float]):
        self.iteration, self.image_ids, self.losses = iteration, image_ids, losses
        parts = ", ".join(f"{k}={v:.4g}" for k, v in losses.items())
        super().__init__(
            f"non-finite loss at iteration {iteration} (rank {distributed.rank()}) for the "
            f"batch of image ids {image_ids}: {parts}; lower the lr, enable clip_grad_norm, "
            "check those images' annotations, or set on_nonfinite: skip")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or not a training checkpoint."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint was written for another model (architecture, classes, layer shapes)."""


@dataclass
class TrainResult:
    """What `train` returns.

    history: one row per iteration: iteration (0-based step index), epoch, loss (weighted
        total), each raw loss component, lr (used by that step), time (seconds of that step),
        skipped (step skipped for a non-finite loss).
    val_history: one row per validation: epoch, iteration (steps done), loss, components.
    state_dict: the final model weights, on CPU.
    """

    history: pd.DataFrame
    val_history: pd.DataFrame
    state_dict: dict[str, torch.Tensor]
    iterations: int
    skipped_steps: int
    last_checkpoint: Path | None


# --------------------------------------------------------------------------- configuration

def resolve_config(config: dict | None) -> dict:
    """`DEFAULT_CONFIG` overlaid with `config` (nested dicts merged); raises on unknown keys."""
    config = dict(config or {})
    _reject_unknown(config, DEFAULT_CONFIG, "training config")
    merged = copy.deepcopy(DEFAULT_CONFIG)
    for key, value in config.items():
        if isinstance(merged[key], dict) and value is not None:
            if key != "loss_weights":  # other models name other losses
                _reject_unknown(value, merged[key], f"training config '{key}'")
            merged[key].update(value)
        else:
            merged[key] = value
    _validate(merged)
    return merged


def _reject_unknown(given: dict, known: dict, where: str) -> None:
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")


def _validate(cfg: dict) -> None:
    checks = [(name, cfg[name], allowed) for name, allowed in _ENUMS.items()]
    checks += [("optimizer.name", cfg["optimizer"]["name"], _OPTIMIZERS),
               ("scheduler.name", cfg["scheduler"]["name"], _SCHEDULERS)]
    for name, value, allowed in checks:
        if value not in allowed:
            raise ValueError(f"training config '{name}' is {value!r}; expected one of {allowed}")
    if int(cfg["max_iters"]) < 1:
        raise ValueError(f"training config 'max_iters' must be >= 1, got {cfg['max_iters']}")


# ------------------------------------------------------------------ optimizer and schedule

def build_optimizer(model: nn.Module, opt_cfg: dict) -> torch.optim.Optimizer:
    """SGD (with momentum) or AdamW over the trainable parameters of `model`."""
    params = [p for p in model.parameters() if p.requires_grad]
    if opt_cfg["name"] == "adamw":
        return torch.optim.AdamW(params, lr=opt_cfg["lr"], weight_decay=opt_cfg["weight_decay"])
    return torch.optim.SGD(params, lr=opt_cfg["lr"], momentum=opt_cfg["momentum"],
                           weight_decay=opt_cfg["weight_decay"])


def lr_factor(iteration: int, cfg: dict) -> float:
    """Multiplier of the base lr for the step `iteration` (0-based): warmup x schedule."""
    return _warmup(iteration, cfg) * _schedule(iteration, cfg)


def _warmup(iteration: int, cfg: dict) -> float:
    warmup_iters = int(cfg["warmup_iters"] or 0)
    if iteration >= warmup_iters:
        return 1.0
    alpha = iteration / warmup_iters
    return cfg["warmup_factor"] * (1.0 - alpha) + alpha


def _schedule(iteration: int, cfg: dict) -> float:
    sched = cfg["scheduler"]
    if sched["name"] == "multistep":
        passed = sum(1 for m in sched["milestones"] or () if iteration >= m)
        return sched["gamma"] ** passed
    if sched["name"] == "cosine":
        progress = min(iteration / cfg["max_iters"], 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer,
                    cfg: dict) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-iteration LambdaLR following `lr_factor` (its state is just the step count)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, cfg))


# ----------------------------------------------------------------------- device and losses

def resolve_device(name: str) -> torch.device:
    """torch.device for 'auto' | 'cpu' | 'cuda'; under DDP on CUDA, this rank's GPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("training config 'device' is 'cuda' but CUDA is not available")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", distributed.local_rank())


def move_batch(images: Sequence[torch.Tensor], targets: Sequence[dict],
               device: torch.device) -> tuple[list[torch.Tensor], list[dict]]:
    """Images (float [3, H, W]) and the tensor entries of targets moved to `device`."""
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                for k, v in t.items()} for t in targets]
    return images, targets


def weighted_loss(loss_dict: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """Sum of `weights[name] * loss` (weight 1.0 for losses `weights` does not name)."""
    return sum(float(weights.get(k, 1.0)) * v for k, v in loss_dict.items())


def image_ids(targets: Sequence[dict]) -> list:
    """The `image_id` of each target as plain ints (None where a target has none)."""
    ids = [t.get("image_id") for t in targets]
    return [int(i) if torch.is_tensor(i) and i.numel() == 1 else i for i in ids]


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def set_min_size(model: nn.Module, size: int) -> None:
    """Make a torchvision detector resize its next batch to shorter side `size`."""
    inner = unwrap(model)
    if not hasattr(inner, "transform"):
        raise TypeError(f"multiscale needs a model with a .transform (torchvision detector); "
                        f"got {type(inner).__name__}")
    inner.transform.min_size = (int(size),)


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


def validation_loss(model: nn.Module, loader: Iterable, device: torch.device,
                    loss_weights: dict[str, float], amp: bool = False) -> dict[str, float]:
    """Mean weighted loss and mean components over `loader` (averaged over ranks under DDP).

    torchvision detectors return losses only in train mode, so the model runs in train mode
    under no_grad, with BatchNorm layers in eval mode so validation leaves their running
    statistics untouched. Proposal sampling in train mode is random: the global RNG state
    is saved and restored around it so validation does not change the training run.
    """
    sums: dict[str, float] = collections.defaultdict(float)
    batches = 0
    with _bn_frozen(model), _rng_preserved(), torch.no_grad():
        for images, targets in loader:
            images, targets = move_batch(images, targets, device)
            with torch.autocast(device_type=device.type, enabled=amp):
                loss_dict = model(images, targets)
            for name, value in _as_floats(loss_dict, loss_weights).items():
                sums[name] += value
            batches += 1
    return _mean_over_ranks(sums, batches, device)


def _mean_over_ranks(sums: dict[str, float], count: int, device: torch.device) -> dict[str, float]:
    names = sorted(sums)
    totals = torch.tensor([sums[n] for n in names] + [float(count)], dtype=torch.float64,
                          device=device)
    totals = distributed.all_reduce_sum(totals).tolist()
    return {n: v / max(totals[-1], 1.0) for n, v in zip(names, totals[:-1], strict=True)}


def _as_floats(loss_dict: dict[str, torch.Tensor], weights: dict[str, float]) -> dict[str, float]:
    """{'loss': weighted total, **components} as Python floats."""
    values = {"loss": float(weighted_loss(loss_dict, weights).detach())}
    values.update({k: float(v.detach()) for k, v in loss_dict.items()})
    return values


# ------------------------------------------------------------------------------ RNG states

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


def _as_tuples(value: Any) -> Any:
    """random.setstate needs tuples where a serialiser may have produced lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


@contextmanager
def _rng_preserved() -> Iterator[None]:
    state = capture_rng()
    try:
        yield
    finally:
        restore_rng(state)


def seed_everything(seed: int) -> None:
    """Seed python, numpy's global RNG and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------ checkpoints

def checkpoint_path(checkpoint_dir: str | Path, iteration: int) -> Path:
    """`<dir>/ckpt_<iteration:08d>.pt`."""
    return Path(checkpoint_dir) / f"ckpt_{iteration:08d}.pt"


def list_checkpoints(checkpoint_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `checkpoint_dir`, oldest first (temporary files excluded)."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CKPT_NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The checkpoint with the highest iteration, or None when there is none."""
    found = list_checkpoints(checkpoint_dir)
    return found[-1] if found else None


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Write `state` to `path` atomically: temp file in the same folder, fsync, os.replace.

    A crash at any point leaves either the old file or the new one, never a partial file
    under the final name; the temp file is removed on errors (a hard kill may leave one,
    which `remove_stale_temp_files` and `list_checkpoints` handle).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temp_files(checkpoint_dir: str | Path) -> list[Path]:
    """Delete temp files left by a checkpoint write that was killed; return them."""
    folder = Path(checkpoint_dir)
    stale = sorted(folder.glob(".ckpt_*.pt.*.tmp")) if folder.is_dir() else []
    for tmp in stale:
        logger.warning("removing %s, left by an interrupted checkpoint write", tmp)
        tmp.unlink(missing_ok=True)
    return stale


def prune_checkpoints(checkpoint_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints (keep < 1 keeps all); return deleted."""
    found = list_checkpoints(checkpoint_dir)
    doomed = found[:-keep] if keep and keep > 0 else []
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def load_checkpoint(path: str | Path) -> dict:
    """Read a training checkpoint (weights_only) onto the CPU; CheckpointError if unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated / foreign files
        raise CheckpointError(f"checkpoint {path} cannot be read (truncated or corrupt?): "
                              f"{type(exc).__name__}: {exc}") from exc
    missing = [k for k in _CKPT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a training checkpoint of this "
                              f"project: missing {missing}")
    return state


def check_model_config(saved: dict, current: dict, path: str | Path) -> None:
    """Raise CheckpointMismatchError naming each field where `saved` and `current` differ."""
    fields = sorted((set(saved) | set(current)) - set(_RESUME_IGNORED_FIELDS))
    diffs = [f"{f}: checkpoint has {saved.get(f)!r}, current model has {current.get(f)!r}"
             for f in fields if saved.get(f) != current.get(f)]
    if diffs:
        raise CheckpointMismatchError(f"checkpoint {path} was written for a different model "
                                      f"({'; '.join(diffs)})")


# ---------------------------------------------------------------------------- the loop

@dataclass
class _Run:
    """Mutable state of one `train` call; methods are the steps of the loop."""

    model: nn.Module
    cfg: dict
    device: torch.device
    amp: bool
    checkpoint_dir: Path
    model_config: dict
    callbacks: Sequence[Callback]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    iteration: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    skipped: int = 0
    history: list[dict] = field(default_factory=list)
    val_history: list[dict] = field(default_factory=list)
    last_checkpoint: Path | None = None
    saved_at: int = -1
    validated_at: int = -1
    pending_rng: dict | None = None
    bar: Any = None
    window_start: float = field(default_factory=time.perf_counter)

    @property
    def raw(self) -> nn.Module:
        return unwrap(self.model)

    # ---- setup
    def start(self, resume: str | Path) -> None:
        """Seed a fresh run or load the checkpoint `resume` points at; then wrap for DDP."""
        if distributed.is_main_process():
            remove_stale_temp_files(self.checkpoint_dir)
        path = distributed.all_gather_objects(self._resume_path(resume))[0]
        if path is None:
            seed_everything(int(self.cfg["seed"]) + distributed.rank())
        else:
            self._load(path)
        if distributed.world_size() > 1:
            self._wrap_ddp()

    def _resume_path(self, resume: str | Path) -> Path | None:
        if resume in (None, "none"):
            return None
        if resume == "auto":
            path = latest_checkpoint(self.checkpoint_dir)
            if path is None:
                logger.info("resume=auto: no checkpoint in %s, starting fresh",
                            self.checkpoint_dir)
            return path
        return Path(resume)

    def _load(self, path: Path) -> None:
        state = load_checkpoint(path)
        check_model_config(state["model_config"], self.model_config, path)
        try:
            self.raw.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise CheckpointMismatchError(
                f"checkpoint {path} does not fit the model: {exc}") from exc
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler.is_enabled() and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self._load_progress(state)
        logger.info("resumed from %s at iteration %d (epoch %d, batch %d)",
                    path, self.iteration, self.epoch, self.batch_in_epoch)

    def _load_progress(self, state: dict) -> None:
        self.iteration, self.epoch = int(state["iteration"]), int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.history = list(state["history"])
        self.val_history = list(state.get("val_history", []))
        self.skipped = int(state.get("skipped_steps", 0))
        self.saved_at = self.validated_at = self.iteration
        rngs = state["rng"]
        if len(rngs) != distributed.world_size():
            logger.warning("checkpoint holds RNG states of %d rank(s), this run has %d: "
                           "randomness will not replay exactly", len(rngs),
                           distributed.world_size())
        self.pending_rng = rngs[min(distributed.rank(), len(rngs) - 1)]

    def _wrap_ddp(self) -> None:
        ids = [self.device.index] if self.device.type == "cuda" else None
        self.model = DistributedDataParallel(
            self.model, device_ids=ids,
            find_unused_parameters=bool(self.cfg["find_unused_parameters"]))

    # ---- loop
    def run(self, make_loader: Callable[[int], Iterable], multiscale: Any,
            val_loader: Iterable | None) -> None:
        self.model.train()
        self.bar = tqdm(total=self.cfg["max_iters"], initial=self.iteration, unit="it",
                        dynamic_ncols=True, disable=not self._show_bar())
        with self.bar:
            while self.iteration < self.cfg["max_iters"]:
                self._run_epoch(make_loader, multiscale, val_loader)
        self._finish(val_loader)

    def _show_bar(self) -> bool:
        return bool(self.cfg["progress_bar"]) and distributed.is_main_process()

    def _run_epoch(self, make_loader: Callable[[int], Iterable], multiscale: Any,
                   val_loader: Iterable | None) -> None:
        opened = self._open_epoch(make_loader)
        if opened is None:
            return
        batches, n_batches = opened
        for images, targets in batches:
            self._step(images, targets, multiscale)
            if self._after_batch(n_batches, val_loader):
                return

    def _open_epoch(self, make_loader: Callable[[int], Iterable]) -> tuple[Iterator, int] | None:
        """This epoch's batches (consumed ones skipped) and its length; None to move on."""
        if self.batch_in_epoch == 0:  # replay RNG draws made while building the loader too
            self._restore_pending_rng()
        loader = make_loader(self.epoch)
        n_batches = len(loader)
        if n_batches == 0:
            raise ValueError(f"make_loader({self.epoch}) returned an empty loader")
        if self.batch_in_epoch >= n_batches:
            logger.warning("epoch %d has %d batches, fewer than the %d the checkpoint had "
                           "consumed: moving to the next epoch", self.epoch, n_batches,
                           self.batch_in_epoch)
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            return None
        return self._skip_consumed(iter(loader)), n_batches

    def _after_batch(self, n_batches: int, val_loader: Iterable | None) -> bool:
        """Epoch end or periodic checkpoint; True when this epoch's loop must stop."""
        self.batch_in_epoch += 1
        if self.batch_in_epoch >= n_batches:
            self._end_epoch(val_loader)
            return True
        if self._checkpoint_due():
            self.save()
        return self.iteration >= self.cfg["max_iters"]

    def _skip_consumed(self, batches: Iterator) -> Iterator:
        """Drop the batches the interrupted run consumed, then restore its RNG states.

        Restoring after skipping makes random work done while loading those batches
        irrelevant: the next batch and step see exactly the RNG state they saw originally.
        """
        if self.batch_in_epoch:
            logger.info("skipping %d consumed batch(es) of epoch %d", self.batch_in_epoch,
                        self.epoch)
            collections.deque(itertools.islice(batches, self.batch_in_epoch), maxlen=0)
        self._restore_pending_rng()
        return batches

    def _restore_pending_rng(self) -> None:
        if self.pending_rng is not None:
            restore_rng(self.pending_rng)
            self.pending_rng = None

    def _checkpoint_due(self) -> bool:
        every = self.cfg["checkpoint_every"]
        return bool(every) and self.iteration % int(every) == 0

    def _end_epoch(self, val_loader: Iterable | None) -> None:
        self.epoch += 1
        self.batch_in_epoch = 0
        self._validate(val_loader)
        self._emit("epoch_end", epoch=self.epoch - 1)
        self.save()

    def _finish(self, val_loader: Iterable | None) -> None:
        """Validate and save a run that stopped inside an epoch."""
        if self.validated_at != self.iteration:
            self._validate(val_loader)
        if self.saved_at != self.iteration:
            self.save()

    # ---- one step
    def _step(self, images: Sequence[torch.Tensor], targets: Sequence[dict],
              multiscale: Any) -> None:
        start = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        loss_dict, loss = self._forward(images, targets, multiscale)
        finite = distributed.all_true(bool(torch.isfinite(loss).all()), self.device)
        if not finite and self.cfg["on_nonfinite"] == "error":
            raise NonFiniteLossError(self.iteration, image_ids(targets),
                                     _as_floats(loss_dict, self.cfg["loss_weights"]))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if finite:
            self._update()
        else:
            self._skip(loss_dict, targets)
        self.scheduler.step()
        self._record(loss_dict, lr, time.perf_counter() - start, skipped=not finite)

    def _forward(self, images: Sequence[torch.Tensor], targets: Sequence[dict],
                 multiscale: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The model's loss dict and the weighted total for one batch."""
        if multiscale is not None:
            set_min_size(self.model, multiscale.choose(self.iteration))
        images, targets = move_batch(images, targets, self.device)
        with torch.autocast(device_type=self.device.type, enabled=self.amp):
            loss_dict = self.model(images, targets)
        return loss_dict, weighted_loss(loss_dict, self.cfg["loss_weights"])

    def _update(self) -> None:
        clip = self.cfg["clip_grad_norm"]
        if clip:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, float(clip))
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def _skip(self, loss_dict: dict, targets: Sequence[dict]) -> None:
        """Drop this step's gradients and count it (on_nonfinite: skip).

        Backward already ran on every rank so DDP's gradient reduction stays in step
        across ranks; the gradients are discarded instead of applied.
        """
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped += 1
        loss = _as_floats(loss_dict, self.cfg["loss_weights"])["loss"]
        logger.warning("skipping iteration %d: non-finite loss (%s) on some rank; this "
                       "rank's image ids %s", self.iteration, loss, image_ids(targets))

    def _record(self, loss_dict: dict, lr: float, seconds: float, skipped: bool) -> None:
        row = {"iteration": self.iteration, "epoch": self.epoch,
               **_as_floats(loss_dict, self.cfg["loss_weights"]),
               "lr": lr, "time": seconds, "skipped": skipped}
        self.history.append(row)
        self.iteration += 1
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.3g}", refresh=False)
        self._emit("step_end", losses=row, lr=lr)
        log_every = int(self.cfg["log_every"] or 0)
        if log_every and self.iteration % log_every == 0:
            self._log_window(log_every)

    def _log_window(self, size: int) -> None:
        """Log the mean losses of the last `size` iterations and the speed."""
        rows = self.history[-size:]
        now = time.perf_counter()
        speed = len(rows) / max(now - self.window_start, 1e-9)
        self.window_start = now
        means = pd.DataFrame(rows).drop(columns=["iteration", "epoch", "lr", "time", "skipped"])
        parts = " ".join(f"{k} {v:.4f}" for k, v in means.mean().items())
        if distributed.is_main_process():
            logger.info("iter %d/%d epoch %d %s lr %.3g %.2f it/s", self.iteration,
                        self.cfg["max_iters"], self.epoch, parts, rows[-1]["lr"], speed)

    # ---- validation, checkpoints, callbacks
    def _validate(self, val_loader: Iterable | None) -> None:
        if val_loader is None:
            return
        values = validation_loss(self.raw, val_loader, self.device, self.cfg["loss_weights"],
                                 self.amp)
        self.val_history.append({"epoch": self.epoch, "iteration": self.iteration, **values})
        self.validated_at = self.iteration
        if distributed.is_main_process():
            logger.info("validation after iteration %d: loss %.4f", self.iteration,
                        values.get("loss", float("nan")))
        self._emit("validation", losses=values)

    def save(self) -> Path:
        """Checkpoint now (rank 0 writes; every rank contributes its RNG state)."""
        rngs = distributed.all_gather_objects(capture_rng())
        path = checkpoint_path(self.checkpoint_dir, self.iteration)
        if distributed.is_main_process():
            save_checkpoint(self._state(rngs), path)
            prune_checkpoints(self.checkpoint_dir, int(self.cfg["keep_checkpoints"] or 0))
            logger.debug("saved %s", path)
        self.last_checkpoint, self.saved_at = path, self.iteration
        self._emit("checkpoint", path=path)
        return path

    def _state(self, rngs: list[dict]) -> dict:
        return {"format_version": 1, "model": self.raw.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": self.epoch, "iteration": self.iteration,
                "batch_in_epoch": self.batch_in_epoch, "rng": rngs,
                "model_config": dict(self.model_config), "history": self.history,
                "val_history": self.val_history, "skipped_steps": self.skipped,
                "config": self.cfg}

    def _emit(self, event: str, **info: Any) -> None:
        info = {"iteration": self.iteration, "epoch": self.epoch, "model": self.raw,
                "rank": distributed.rank(), **info}
        for callback in self.callbacks:
            callback(event, info)

    def result(self) -> TrainResult:
        state = {k: v.detach().cpu().clone() for k, v in self.raw.state_dict().items()}
        return TrainResult(history=pd.DataFrame(self.history),
                           val_history=pd.DataFrame(self.val_history), state_dict=state,
                           iterations=self.iteration, skipped_steps=self.skipped,
                           last_checkpoint=self.last_checkpoint)


def _resolve_amp(setting: Any, device: torch.device) -> bool:
    """AMP only on CUDA: 'auto' turns it on there, True on CPU is refused with a warning."""
    if device.type != "cuda":
        if setting is True:
            logger.warning("amp=True ignored: mixed precision training needs CUDA")
        return False
    return setting in ("auto", True)


def train(model: nn.Module, make_loader: Callable[[int], Iterable], config: dict | None, *,
          checkpoint_dir: str | Path, resume: str | Path = "none", model_config: dict,
          multiscale: Any = None, val_loader: Iterable | None = None,
          callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Train `model` for `config["max_iters"]` iterations; see the module docstring.

    resume: "none" | "auto" (newest checkpoint in `checkpoint_dir`, else fresh) | a path.
    model_config: the model's identity (architecture, num_classes, ...); stored in
        checkpoints and compared on resume (CheckpointMismatchError names differing fields).
    multiscale: object with `choose(iteration) -> int`, the shorter side for that step.
    val_loader: batches like `make_loader`'s; mean validation losses after each epoch.
    callbacks: `callback(event, info)` with event "step_end" | "epoch_end" | "validation" |
        "checkpoint"; info has iteration (steps done), epoch, model (unwrapped), rank, and
        losses / lr / path by event. Called on every rank.
    Raises NonFiniteLossError (on_nonfinite: error), CheckpointError, CheckpointMismatchError.
    """
    cfg = resolve_config(config)
    device = resolve_device(cfg["device"])
    amp = _resolve_amp(cfg["amp"], device)
    model.to(device)
    optimizer = build_optimizer(model, cfg["optimizer"])
    run = _Run(model=model, cfg=cfg, device=device, amp=amp,
               checkpoint_dir=Path(checkpoint_dir), model_config=dict(model_config),
               callbacks=tuple(callbacks), optimizer=optimizer,
               scheduler=build_scheduler(optimizer, cfg),
               scaler=torch.amp.GradScaler(device.type, enabled=amp))
    logger.info("training on %s (amp %s, world size %d) for %d iterations", device,
                amp, distributed.world_size(), cfg["max_iters"])
    run.start(resume)
    run.run(make_loader, multiscale, val_loader)
    return run.result()
