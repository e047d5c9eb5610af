"""The training loop: `train` sets a run up, `train_one_epoch` is the step loop.

`train(model, make_loader, config, model_config=...)` runs ``config.max_iters`` optimizer
steps of a detection model that, in train mode, maps ``(images, targets)`` to a dict of
scalar losses (the models contract). It takes objects, not paths:

- ``make_loader(epoch)`` returns an iterable of ``(images, targets)`` batches, with
  ``images: list[float Tensor[3, H, W]]`` and ``targets: list[dict]`` (torchvision keys; an
  ``image_id`` entry names the image in error messages). It must give the same batches in
  the same order every time it is called with the same epoch, without drawing from the
  global RNGs (give samplers their own ``torch.Generator`` seeded from the epoch): resume
  skips the batches the interrupted run consumed and relies on that order. ``len()`` is
  the number of batches per epoch. Under DDP each rank's loader yields that rank's shard,
  the same number of batches on every rank.
- ``config``: the typed ``training`` block (`engine.config.TrainingConfig`).

With ``config.time_budget_min`` the run also stops at the first step end after that many
minutes of steps, and the schedule follows the elapsed share of the budget instead of the
share of ``max_iters`` (a cosine ends at the budget; multistep milestones fire at their
fraction of ``max_iters`` of it), so a budget is "train for N minutes" on any machine; the
number of steps then depends on the machine's speed, so such a run does not repeat bit for
bit. ``max_iters`` stays a cap.

With ``config.ema.decay`` set, an exponential moving average of the weights
(`engine.ema.ModelEMA`) follows every optimizer step; `TrainState.eval_model` is then the
averaged copy, which validation and model selection evaluate and whose weights `train`
returns (the losses stay those of the trained weights), and checkpoints carry its state.

Everything around the steps is a `engine.callbacks.Callback`: progress bar, loss logging,
validation loss, checkpoints (every ``checkpoint_every`` steps, at epoch ends and at the end;
see `engine.checkpoint`), model selection, and the caller's callbacks.
"""
from __future__ import annotations

import collections
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from instseg_pipeline.engine import checkpoint, distributed
from instseg_pipeline.engine.callbacks import (
    Callback,
    Checkpointer,
    LossLogger,
    ProgressBar,
    ValidationLoss,
    as_callback,
)
from instseg_pipeline.engine.config import OptimizerConfig, TrainingConfig
from instseg_pipeline.engine.ema import ModelEMA
from instseg_pipeline.engine.losses import image_ids, loss_values, move_batch, weighted_loss
from instseg_pipeline.engine.rng import restore_rng, seed_everything
from instseg_pipeline.predict.device import resolve_device

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """A loss was NaN or infinite; carries `iteration`, `image_ids` and `losses`."""

    def __init__(self, iteration: int, image_ids: list, losses: dict[str, float]):
        self.iteration, self.image_ids, self.losses = iteration, image_ids, losses
        parts = ", ".join(f"{k}={v:.4g}" for k, v in losses.items())
        super().__init__(
            f"non-finite loss at iteration {iteration} (rank {distributed.rank()}) for the "
            f"batch of image ids {image_ids}: {parts}; lower the lr, enable clip_grad_norm, "
            "check those images' annotations, or set on_nonfinite: skip")


@dataclass
class TrainResult:
    """What `train` returns.

    history: one row per iteration: iteration (0-based step index), epoch, loss (weighted
        total), each raw loss component, lr (used by that step), time (seconds of that step),
        skipped (step skipped for a non-finite loss).
    val_history: one row per validation: epoch, iteration (steps done), loss, components.
    state_dict: the final model weights, on CPU (the moving average's with ``ema``).
    """

    history: pd.DataFrame
    val_history: pd.DataFrame
    state_dict: dict[str, torch.Tensor]
    iterations: int
    skipped_steps: int
    last_checkpoint: Path | None


@dataclass
class TrainState:
    """Everything one `train` call changes; the callbacks read it, the loop moves it."""

    config: TrainingConfig
    model: nn.Module                    # wrapped in DistributedDataParallel under DDP
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    device: torch.device
    amp: bool
    model_config: dict                  # the model's identity, compared on resume
    callbacks: list[Callback] = field(default_factory=list)
    iteration: int = 0                  # optimizer steps done
    epoch: int = 0                      # epochs done
    batch_in_epoch: int = 0             # batches of the current epoch consumed
    epoch_batches: int = 0              # len() of the current epoch's loader
    skipped: int = 0                    # steps skipped for a non-finite loss
    step_images: int = 0                # images in this rank's batch of the last step
    history: list[dict] = field(default_factory=list)
    val_history: list[dict] = field(default_factory=list)
    last_checkpoint: Path | None = None
    pending_rng: dict | None = None     # a resumed run's RNG states, restored where it stood
    budget: TimeBudget | None = None    # training.time_budget_min, when set
    ema: ModelEMA | None = None         # training.ema, when on

    def done(self) -> bool:
        """The run has taken its steps or spent its time budget."""
        return self.iteration >= self.config.max_iters or bool(
            self.budget and self.budget.spent())

    @property
    def raw_model(self) -> nn.Module:
        """The model without its DDP wrapper."""
        return distributed.unwrap(self.model)

    @property
    def eval_model(self) -> nn.Module:
        """The model validation and selection evaluate: the moving average's copy when
        ``ema`` is on, else the trained model (unwrapped)."""
        return self.ema.module if self.ema is not None else self.raw_model

    def fire(self, event: str, *args: Any) -> None:
        """Call ``on_<event>(self, *args)`` of every callback, in order."""
        for callback in self.callbacks:
            getattr(callback, f"on_{event}")(self, *args)

    def record(self, loss_dict: dict, lr: float, seconds: float, skipped: bool) -> dict:
        """Append the history row of the step just taken and count the step."""
        row = {"iteration": self.iteration, "epoch": self.epoch,
               **loss_values(loss_dict, self.config.loss_weights),
               "lr": lr, "time": seconds, "skipped": skipped}
        self.history.append(row)
        self.iteration += 1
        self.batch_in_epoch += 1
        return row

    def result(self) -> TrainResult:
        state = {k: v.detach().cpu().clone() for k, v in self.eval_model.state_dict().items()}
        return TrainResult(history=pd.DataFrame(self.history),
                           val_history=pd.DataFrame(self.val_history), state_dict=state,
                           iterations=self.iteration, skipped_steps=self.skipped,
                           last_checkpoint=self.last_checkpoint)


class TimeBudget:
    """A wall-clock budget of training steps: ``progress()`` is the elapsed share (0 before
    `start`), ``spent()`` whether it is used up."""

    def __init__(self, minutes: float):
        self.seconds = float(minutes) * 60.0
        self.started: float | None = None

    def start(self) -> None:
        self.started = time.perf_counter()

    def progress(self) -> float:
        if self.started is None:
            return 0.0
        return (time.perf_counter() - self.started) / self.seconds

    def spent(self) -> bool:
        return self.progress() >= 1.0


# ---------------------------------------------------------------------------- the loop

def train(model: nn.Module, make_loader: Callable[[int], Iterable], config: TrainingConfig, *,
          model_config: dict, multiscale: Any = None, val_loader: Iterable | None = None,
          callbacks: Sequence[Callback | Callable[[str, dict], None]] = ()) -> TrainResult:
    """Train `model` for ``config.max_iters`` steps; see the module docstring.

    config.resume: "none" | "auto" (newest checkpoint in config.checkpoint_dir, else fresh) |
        a path.
    model_config: the model's identity (architecture, num_classes, ...); stored in
        checkpoints and compared on resume (CheckpointMismatchError names differing fields).
    multiscale: object with ``choose(iteration) -> int``, the shorter side for that step.
    val_loader: batches like `make_loader`'s; mean validation losses after each epoch.
    callbacks: `Callback` objects or functions ``fn(event, info)``; called on every rank.
    Raises NonFiniteLossError (on_nonfinite: error), CheckpointError, CheckpointMismatchError.
    """
    state = _setup(model, config, model_config)
    state.callbacks = _attach(config, val_loader, callbacks)
    logger.info("training on %s (amp %s, world size %d) for %d iterations%s", state.device,
                state.amp, distributed.world_size(), config.max_iters,
                f" or {config.time_budget_min:g} minutes" if state.budget else "")
    if state.ema is not None:
        logger.info("EMA of the weights on: decay %g, ramp over %d iterations; validation, "
                    "selection and the trained model use the average", state.ema.decay,
                    state.ema.warmup_iters)
    _start(state)
    state.fire("train_start")
    if state.budget is not None:
        state.budget.start()
    while not state.done():
        batches = _open_epoch(state, make_loader)
        if batches is None:
            continue
        train_one_epoch(state, batches, multiscale)
        if state.batch_in_epoch == state.epoch_batches:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            state.fire("epoch_end")
    if state.budget is not None and state.iteration < config.max_iters:
        logger.info("time budget of %g minutes spent after %d iterations",
                    config.time_budget_min, state.iteration)
    state.fire("train_end")
    return state.result()


def train_one_epoch(state: TrainState, batches: Iterable, multiscale: Any = None) -> None:
    """Optimizer steps over `batches` (what is left of this epoch) until it or the run ends.

    Each step: batch to the device -> forward -> weighted loss -> non-finite check (all
    ranks agree) -> backward -> clip -> optimizer step -> EMA update (when on) -> lr
    schedule -> record, then the callbacks' on_step_end.
    """
    cfg, model, optimizer, scaler = state.config, state.model, state.optimizer, state.scaler
    for images, targets in batches:
        start, lr = time.perf_counter(), optimizer.param_groups[0]["lr"]
        if multiscale is not None:
            set_min_size(model, multiscale.choose(state.iteration))
        images, targets = move_batch(images, targets, state.device)
        state.step_images = len(images)
        with torch.autocast(device_type=state.device.type, enabled=state.amp):
            loss_dict = model(images, targets)
        loss = weighted_loss(loss_dict, cfg.loss_weights)
        finite = distributed.all_true(bool(torch.isfinite(loss).all()), state.device)
        if not finite and cfg.on_nonfinite == "error":
            raise NonFiniteLossError(state.iteration, image_ids(targets),
                                     loss_values(loss_dict, cfg.loss_weights))
        optimizer.zero_grad(set_to_none=True)
        # backward on every rank even when skipping, so DDP's gradient reduction stays in step
        scaler.scale(loss).backward()
        if finite:
            _clip_gradients(state)
            scaler.step(optimizer)
            scaler.update()
            if state.ema is not None:
                state.ema.update(state.raw_model)
        else:
            _discard_step(state, loss_dict, targets)
        state.scheduler.step()
        step = state.record(loss_dict, lr, time.perf_counter() - start, skipped=not finite)
        state.fire("step_end", step)
        if state.batch_in_epoch == state.epoch_batches or state.done():
            return


def _clip_gradients(state: TrainState) -> None:
    """Scale the gradients down to total L2 norm ``clip_grad_norm`` (when set)."""
    if not state.config.clip_grad_norm:
        return
    state.scaler.unscale_(state.optimizer)
    params = [p for g in state.optimizer.param_groups for p in g["params"]]
    torch.nn.utils.clip_grad_norm_(params, float(state.config.clip_grad_norm))


def _discard_step(state: TrainState, loss_dict: dict, targets: Sequence[dict]) -> None:
    """Drop this step's gradients and count it (on_nonfinite: skip)."""
    state.optimizer.zero_grad(set_to_none=True)
    state.skipped += 1
    loss = loss_values(loss_dict, state.config.loss_weights)["loss"]
    logger.warning("skipping iteration %d: non-finite loss (%s) on some rank; this "
                   "rank's image ids %s", state.iteration, loss, image_ids(targets))


# ------------------------------------------------------------------------------ set-up

def _setup(model: nn.Module, config: TrainingConfig, model_config: dict) -> TrainState:
    """Device, AMP, optimizer, lr schedule, gradient scaler and EMA around `model`."""
    device = resolve_device(config.device, "training.device")
    amp = resolve_amp(config.amp, device)
    model.to(device)
    optimizer = build_optimizer(model, config.optimizer)
    budget = TimeBudget(config.time_budget_min) if config.time_budget_min else None
    # a copy of the initial weights; a resume loads its checkpoint's average into it
    ema = (ModelEMA(distributed.unwrap(model), config.ema.decay, config.ema.warmup_iters)
           if config.ema.decay else None)
    return TrainState(config=config, model=model, optimizer=optimizer,
                      scheduler=build_scheduler(optimizer, config, budget),
                      scaler=torch.amp.GradScaler(device.type, enabled=amp),
                      device=device, amp=amp, model_config=dict(model_config), budget=budget,
                      ema=ema)


def _attach(config: TrainingConfig, val_loader: Iterable | None,
            callbacks: Sequence[Callback | Callable]) -> list[Callback]:
    """The built-in callbacks around the caller's, in the order the module docstring of
    `engine.callbacks` gives."""
    validation = [ValidationLoss(val_loader)] if val_loader is not None else []
    return [ProgressBar(config.progress_bar), *validation, *map(as_callback, callbacks),
            LossLogger(config.log_every),
            Checkpointer(config.checkpoint_dir, config.checkpoint_every, config.keep_checkpoints)]


def _start(state: TrainState) -> None:
    """Seed a fresh run or restore the checkpoint ``resume`` names; then wrap for DDP.

    Rank 0's choice of checkpoint holds for every rank, so all resume from the same one.
    """
    cfg = state.config
    if distributed.is_main_process():
        checkpoint.remove_stale_temp_files(cfg.checkpoint_dir)
    path = checkpoint.resume_path(cfg.resume, cfg.checkpoint_dir)
    path = distributed.all_gather_objects(path)[0]
    if path is None:
        seed_everything(cfg.seed + distributed.rank())
    else:
        checkpoint.restore(state, path)
    if distributed.world_size() > 1:
        ids = [state.device.index] if state.device.type == "cuda" else None
        state.model = DistributedDataParallel(state.model, device_ids=ids,
                                              find_unused_parameters=cfg.find_unused_parameters)


def _open_epoch(state: TrainState, make_loader: Callable[[int], Iterable]) -> Iterator | None:
    """This epoch's batches, those a resumed run already consumed skipped; None to move on.

    The resumed run's RNG states are restored where it stood: before building the loader
    at an epoch start (its RNG draws replay too), else after skipping the consumed batches
    (so random work done while loading them does not count).
    """
    if state.batch_in_epoch == 0:
        _restore_pending_rng(state)
    loader = make_loader(state.epoch)
    state.epoch_batches = len(loader)
    if state.epoch_batches == 0:
        raise ValueError(f"make_loader({state.epoch}) returned an empty loader")
    if state.batch_in_epoch >= state.epoch_batches:
        logger.warning("epoch %d has %d batches, fewer than the %d the checkpoint had "
                       "consumed: moving to the next epoch", state.epoch, state.epoch_batches,
                       state.batch_in_epoch)
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        return None
    batches = iter(loader)
    if state.batch_in_epoch:
        logger.info("skipping %d consumed batch(es) of epoch %d", state.batch_in_epoch,
                    state.epoch)
        collections.deque(itertools.islice(batches, state.batch_in_epoch), maxlen=0)
    _restore_pending_rng(state)
    return batches


def _restore_pending_rng(state: TrainState) -> None:
    if state.pending_rng is not None:
        restore_rng(state.pending_rng)
        state.pending_rng = None


# ------------------------------------------------------------------ optimizer and schedule

def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """SGD (with momentum) or AdamW over the trainable parameters of `model`."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainingConfig,
                    budget: TimeBudget | None = None) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-iteration LambdaLR following `lr_factor` (its state is just the step count);
    with a `TimeBudget` the schedule follows its elapsed share."""
    if budget is None:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, cfg))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(it, cfg, budget.progress()))


def lr_factor(iteration: int, cfg: TrainingConfig, progress: float | None = None) -> float:
    """Multiplier of the base lr for the step `iteration` (0-based): warmup x schedule.
    ``progress``: the share of the run done (a time budget's), instead of
    ``iteration / max_iters``."""
    return _warmup(iteration, cfg) * _schedule(iteration, cfg, progress)


def _warmup(iteration: int, cfg: TrainingConfig) -> float:
    if iteration >= cfg.warmup_iters:
        return 1.0
    alpha = iteration / cfg.warmup_iters
    return cfg.warmup_factor * (1.0 - alpha) + alpha


def _schedule(iteration: int, cfg: TrainingConfig, progress: float | None = None) -> float:
    sched = cfg.scheduler
    done = iteration / cfg.max_iters if progress is None else progress
    if sched.name == "multistep":
        passed = (sum(1 for m in sched.milestones if iteration >= m) if progress is None
                  else sum(1 for m in sched.milestones if progress >= m / cfg.max_iters))
        return sched.gamma ** passed
    if sched.name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0)))
    return 1.0


# ------------------------------------------------------------------------ device and model

def resolve_amp(setting: str | bool, device: torch.device) -> bool:
    """AMP only on CUDA: 'auto' turns it on there, True on CPU is refused with a warning."""
    if device.type != "cuda":
        if setting is True:
            logger.warning("amp=True ignored: mixed precision training needs CUDA")
        return False
    return setting in ("auto", True)


def set_min_size(model: nn.Module, size: int) -> None:
    """Make a torchvision detector resize its next batch to shorter side `size`."""
    inner = distributed.unwrap(model)
    if not hasattr(inner, "transform"):
        raise TypeError(f"multiscale needs a model with a .transform (torchvision detector); "
                        f"got {type(inner).__name__}")
    inner.transform.min_size = (int(size),)
