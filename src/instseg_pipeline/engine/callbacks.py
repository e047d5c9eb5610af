"""What is attached to the training loop, all of one kind: `Callback`.

The loop (`engine.loop`) fires named events on every rank, in this order per run::

    on_train_start -> (on_step_end ... on_epoch_end)* -> on_train_end

plus ``on_validation(losses)`` and ``on_checkpoint(path)``, fired by the built-in
`ValidationLoss` and `Checkpointer` when they have run, and ``on_evaluation(metrics)``,
fired by an evaluating callback (model selection's AP) on the rank that evaluated. Each
method gets the `TrainState` (read it; only the loop moves its counters). Built-ins, in the
order `train` attaches them: `ProgressBar`, `ValidationLoss`, the caller's callbacks,
`LossLogger`, `Checkpointer`, so a checkpoint holds what validation and the caller's
callbacks did at that step.

A plain function ``fn(event, info)`` is accepted too (`as_callback`): it sees the event name
without ``on_`` and ``info`` = {iteration (steps done), epoch, model (unwrapped), rank, plus
losses (the history row) / lr / images (the step's batch size on this rank) (step_end),
losses (validation), metrics (evaluation) or path (checkpoint)}. For ``epoch_end`` the
epoch is the index of the epoch that ended.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from tqdm import tqdm

from instseg_pipeline.engine import checkpoint, distributed
from instseg_pipeline.engine.losses import validation_loss
from instseg_pipeline.engine.rng import capture_rng
from instseg_pipeline.progress import format_seconds, interactive

if TYPE_CHECKING:
    from instseg_pipeline.engine.loop import TrainState

logger = logging.getLogger(__name__)

EVENTS = ("train_start", "step_end", "epoch_end", "validation", "evaluation", "checkpoint",
          "train_end")


class Callback:
    """Hooks of the training loop; override the events you need (all do nothing here)."""

    def on_train_start(self, state: TrainState) -> None:
        """Before the first step (after a resume loaded its checkpoint)."""

    def on_step_end(self, state: TrainState, step: dict) -> None:
        """After each optimizer step; ``step`` is the history row it added."""

    def on_epoch_end(self, state: TrainState) -> None:
        """After the last batch of an epoch; ``state.epoch`` already counts it."""

    def on_validation(self, state: TrainState, losses: dict[str, float]) -> None:
        """After a validation pass; ``losses``: mean weighted loss and components."""

    def on_evaluation(self, state: TrainState, metrics: dict[str, float]) -> None:
        """After a callback evaluated the model; ``metrics``: name -> value (e.g. segm_mAP)."""

    def on_checkpoint(self, state: TrainState, path: Path) -> None:
        """After a checkpoint was written (by rank 0) to ``path``."""

    def on_train_end(self, state: TrainState) -> None:
        """After the last step; `ValidationLoss` and `Checkpointer` catch up here when it
        was not an epoch end."""


def as_callback(callback: Callback | Callable[[str, dict], None]) -> Callback:
    """``callback`` itself, or a function ``fn(event, info)`` wrapped as a `Callback`."""
    return callback if isinstance(callback, Callback) else FunctionCallback(callback)


class FunctionCallback(Callback):
    """Calls ``fn(event, info)`` for every event (see the module docstring for ``info``)."""

    def __init__(self, fn: Callable[[str, dict], None]):
        self.fn = fn

    def _call(self, event: str, state: TrainState, epoch: int | None = None, **info: Any):
        self.fn(event, {"iteration": state.iteration,
                        "epoch": state.epoch if epoch is None else epoch,
                        "model": state.raw_model, "rank": distributed.rank(), **info})

    def on_train_start(self, state: TrainState) -> None:
        self._call("train_start", state)

    def on_step_end(self, state: TrainState, step: dict) -> None:
        self._call("step_end", state, epoch=step["epoch"], losses=step, lr=step["lr"],
                   images=state.step_images)

    def on_epoch_end(self, state: TrainState) -> None:
        self._call("epoch_end", state, epoch=state.epoch - 1)

    def on_validation(self, state: TrainState, losses: dict[str, float]) -> None:
        self._call("validation", state, losses=losses)

    def on_evaluation(self, state: TrainState, metrics: dict[str, float]) -> None:
        self._call("evaluation", state, metrics=metrics)

    def on_checkpoint(self, state: TrainState, path: Path) -> None:
        self._call("checkpoint", state, path=path)

    def on_train_end(self, state: TrainState) -> None:
        self._call("train_end", state)


class ProgressBar(Callback):
    """A tqdm bar over max_iters on rank 0 (``progress_bar: false`` hides it), in a terminal
    only: elsewhere `LossLogger`'s lines report the progress (a redrawn bar in a log file is
    one endless line)."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar = enabled, None

    def on_train_start(self, state: TrainState) -> None:
        self.bar = tqdm(total=state.config.max_iters, initial=state.iteration, unit="it",
                        dynamic_ncols=True,
                        disable=not (self.enabled and distributed.is_main_process()
                                     and interactive()))

    def on_step_end(self, state: TrainState, step: dict) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{step['loss']:.4f}", lr=f"{step['lr']:.3g}", refresh=False)

    def on_train_end(self, state: TrainState) -> None:
        self.bar.close()


class LossLogger(Callback):
    """Every ``every`` steps (rank 0): the mean losses of those steps, the lr, the speed
    (images/s over all ranks, it/s) and the time left at that speed."""

    def __init__(self, every: int | None):
        self.every = int(every or 0)
        self.window_start, self.window_images = time.perf_counter(), 0

    def on_train_start(self, state: TrainState) -> None:
        self.window_start, self.window_images = time.perf_counter(), 0

    def on_step_end(self, state: TrainState, step: dict) -> None:
        self.window_images += state.step_images
        if not self.every or state.iteration % self.every:
            return
        rows = state.history[-self.every:]
        now = time.perf_counter()
        seconds = max(now - self.window_start, 1e-9)
        speed, images = len(rows) / seconds, self.window_images * distributed.world_size() / seconds
        self.window_start, self.window_images = now, 0
        means = pd.DataFrame(rows).drop(columns=["iteration", "epoch", "lr", "time", "skipped"])
        parts = " ".join(f"{k} {v:.4f}" for k, v in means.mean().items())
        eta = (state.config.max_iters - state.iteration) / speed
        if distributed.is_main_process():
            logger.info("iter %d/%d epoch %d %s lr %.3g %.2f img/s %.2f it/s ETA %s",
                        state.iteration, state.config.max_iters, state.epoch, parts,
                        rows[-1]["lr"], images, speed, format_seconds(eta))


class ValidationLoss(Callback):
    """Mean validation losses of `TrainState.eval_model` (the moving average's with
    ``training.ema``) after each epoch and at the end (if not just done)."""

    def __init__(self, loader: Iterable):
        self.loader, self.done_at = loader, -1

    def on_train_start(self, state: TrainState) -> None:
        self.done_at = state.iteration  # a resumed run validated where it stopped

    def on_epoch_end(self, state: TrainState) -> None:
        self._validate(state)

    def on_train_end(self, state: TrainState) -> None:
        if self.done_at != state.iteration:
            self._validate(state)

    def _validate(self, state: TrainState) -> None:
        values = validation_loss(state.eval_model, self.loader, state.device,
                                 state.config.loss_weights, state.amp)
        state.val_history.append({"epoch": state.epoch, "iteration": state.iteration, **values})
        self.done_at = state.iteration
        if distributed.is_main_process():
            logger.info("validation after iteration %d: loss %.4f", state.iteration,
                        values.get("loss", float("nan")))
        state.fire("validation", values)


class Checkpointer(Callback):
    """Checkpoints every ``checkpoint_every`` steps, at each epoch end and at the end.

    Every rank contributes its RNG state (a collective); rank 0 writes the file and prunes
    all but the newest ``keep_checkpoints``.
    """

    def __init__(self, checkpoint_dir: str | Path, every: int | None, keep: int | None):
        self.dir, self.every, self.keep = Path(checkpoint_dir), int(every or 0), keep
        self.saved_at = -1

    def on_train_start(self, state: TrainState) -> None:
        self.saved_at = state.iteration  # a resumed run starts from a saved state

    def on_step_end(self, state: TrainState, step: dict) -> None:
        # the epoch's last step is saved by on_epoch_end, with the epoch counted
        inside_epoch = state.batch_in_epoch < state.epoch_batches
        if self.every and state.iteration % self.every == 0 and inside_epoch:
            self.save(state)

    def on_epoch_end(self, state: TrainState) -> None:
        self.save(state)

    def on_train_end(self, state: TrainState) -> None:
        if self.saved_at != state.iteration:
            self.save(state)

    def save(self, state: TrainState) -> Path:
        """Checkpoint now; returns the path rank 0 wrote."""
        rngs = distributed.all_gather_objects(capture_rng())
        path = checkpoint.checkpoint_path(self.dir, state.iteration)
        if distributed.is_main_process():
            checkpoint.save_checkpoint(checkpoint.snapshot(state, rngs), path)
            checkpoint.prune_checkpoints(self.dir, self.keep)
            logger.debug("saved %s", path)
        state.last_checkpoint, self.saved_at = path, state.iteration
        state.fire("checkpoint", path)
        return path
