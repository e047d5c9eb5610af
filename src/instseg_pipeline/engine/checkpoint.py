"""Training checkpoints: what one holds, atomic writes, pruning, finding the newest, resuming.

``<checkpoint_dir>/ckpt_<iteration:08d>.pt`` (iteration = optimizer steps done) holds the
weights, optimizer, scheduler and AMP scaler states, the progress (epoch, batch in epoch,
history), every rank's RNG states, the model config and, when ``training.ema`` is on, the
moving average's state (``ema``: `engine.ema.ModelEMA.state_dict`); it loads with
``torch.load(weights_only=True)``. A write goes to a temp file first, so a killed process
never leaves a partial checkpoint under the final name.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from instseg_pipeline.engine import distributed
from instseg_pipeline.models.torch_files import (
    UnreadableFileError,
    UnsafeFileError,
    load_weights_only,
)

if TYPE_CHECKING:
    from instseg_pipeline.engine.loop import TrainState

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_CKPT_NAME = re.compile(r"^ckpt_(\d{8})\.pt$")
_CKPT_KEYS = ("model", "optimizer", "scheduler", "scaler", "epoch", "iteration",
              "batch_in_epoch", "rng", "model_config", "history", "config")
# initialisation-only fields: resuming overwrites the weights, so they may differ
_RESUME_IGNORED_FIELDS = ("weights", "weights_backbone", "pretrained")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or not a training checkpoint."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint was written for another model (architecture, classes, layer shapes)."""


# ------------------------------------------------------------------- the run <-> a checkpoint

def snapshot(state: TrainState, rngs: list[dict]) -> dict:
    """The checkpoint of `state` now; `rngs` holds every rank's `capture_rng()`."""
    saved = {"format_version": FORMAT_VERSION, "model": state.raw_model.state_dict(),
             "optimizer": state.optimizer.state_dict(),
             "scheduler": state.scheduler.state_dict(), "scaler": state.scaler.state_dict(),
             "epoch": state.epoch, "iteration": state.iteration,
             "batch_in_epoch": state.batch_in_epoch, "rng": rngs,
             "model_config": dict(state.model_config), "history": state.history,
             "val_history": state.val_history, "skipped_steps": state.skipped,
             "config": state.config.as_dict()}
    if state.ema is not None:
        saved["ema"] = state.ema.state_dict()
    return saved


def restore(state: TrainState, path: Path) -> None:
    """Load the checkpoint at `path` into `state`; its RNG states wait in `pending_rng`.

    The RNG states are restored by the loop where the interrupted run stood (after the
    consumed batches were skipped), not here.
    """
    saved = load_checkpoint(path)
    check_model_config(saved["model_config"], state.model_config, path)
    try:
        state.raw_model.load_state_dict(saved["model"])
    except RuntimeError as exc:
        raise CheckpointMismatchError(f"checkpoint {path} does not fit the model: {exc}") from exc
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    _restore_ema(state, saved, path)
    if state.scaler.is_enabled() and saved["scaler"]:
        state.scaler.load_state_dict(saved["scaler"])
    state.iteration, state.epoch = int(saved["iteration"]), int(saved["epoch"])
    state.batch_in_epoch = int(saved["batch_in_epoch"])
    state.history = list(saved["history"])
    state.val_history = list(saved.get("val_history", []))
    state.skipped = int(saved.get("skipped_steps", 0))
    state.pending_rng = _rank_rng(saved["rng"])
    logger.info("resumed from %s at iteration %d (epoch %d, batch %d)",
                path, state.iteration, state.epoch, state.batch_in_epoch)


def _restore_ema(state: TrainState, saved: dict, path: Path) -> None:
    """Continue the checkpoint's moving average; one saved without (``training.ema`` was off)
    starts the average from the restored weights."""
    if state.ema is None:
        if "ema" in saved:
            logger.info("checkpoint %s holds a moving average of the weights; training.ema "
                        "is off, so it is not used", path)
        return
    if "ema" not in saved:
        logger.warning("checkpoint %s holds no moving average of the weights (training.ema "
                       "was off): the average starts from its weights", path)
        state.ema.reset(state.raw_model)
        return
    try:
        state.ema.load_state_dict(saved["ema"])
    except (RuntimeError, KeyError) as exc:
        raise CheckpointMismatchError(f"checkpoint {path}: its moving average of the weights "
                                      f"does not fit the model: {exc}") from exc


def _rank_rng(rngs: list[dict]) -> dict:
    if len(rngs) != distributed.world_size():
        logger.warning("checkpoint holds RNG states of %d rank(s), this run has %d: "
                       "randomness will not replay exactly", len(rngs), distributed.world_size())
    return rngs[min(distributed.rank(), len(rngs) - 1)]


def resume_path(resume: str, checkpoint_dir: str | Path) -> Path | None:
    """The checkpoint ``resume`` names: "none" -> None, "auto" -> newest (or None), a path."""
    if resume in (None, "none"):
        return None
    if resume == "auto":
        path = latest_checkpoint(checkpoint_dir)
        if path is None:
            logger.info("resume=auto: no checkpoint in %s, starting fresh", checkpoint_dir)
        return path
    return Path(resume)


def check_model_config(saved: dict, current: dict, path: str | Path) -> None:
    """Raise CheckpointMismatchError naming each field where `saved` and `current` differ."""
    fields = sorted((set(saved) | set(current)) - set(_RESUME_IGNORED_FIELDS))
    diffs = [f"{f}: checkpoint has {saved.get(f)!r}, current model has {current.get(f)!r}"
             for f in fields if saved.get(f) != current.get(f)]
    if diffs:
        raise CheckpointMismatchError(f"checkpoint {path} was written for a different model "
                                      f"({'; '.join(diffs)})")


# ----------------------------------------------------------------------------- files

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


def prune_checkpoints(checkpoint_dir: str | Path, keep: int | None) -> list[Path]:
    """Delete all but the newest `keep` checkpoints (keep < 1 or None keeps all); return them."""
    found = list_checkpoints(checkpoint_dir)
    doomed = found[:-keep] if keep and keep > 0 else []
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def load_checkpoint(path: str | Path) -> dict:
    """Read a training checkpoint (weights_only) onto the CPU; CheckpointError if unusable,
    also when it holds pickled Python objects (a checkpoint_dir may hold anyone's file)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = load_weights_only(path, "checkpoint")
    except (UnsafeFileError, UnreadableFileError) as exc:  # their messages name the file
        raise CheckpointError(str(exc)) from exc
    except Exception as exc:  # torch raises several types for truncated / foreign files
        raise CheckpointError(f"checkpoint {path} cannot be read (truncated or corrupt?): "
                              f"{type(exc).__name__}: {exc}") from exc
    missing = [k for k in _CKPT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a training checkpoint of this "
                              f"project: missing {missing}")
    return state
