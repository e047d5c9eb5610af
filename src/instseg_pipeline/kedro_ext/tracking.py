"""MLflow logging that is a no-op when tracking is off (no active run).

kedro-mlflow opens the run and logs parameters; this module adds what only the project
knows: the losses, lr and throughput while training runs (`LiveMetrics`), the trained
model, the evaluated model's identity (`tag_model`). Tracking is switched off for every
pipeline with ``INSTSEG_MLFLOW=off`` (see conf/base/mlflow.yml).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping

import pandas as pd

logger = logging.getLogger(__name__)

PIPELINE_NAMES = ("__default__", "synthetic", "ingestion", "training", "evaluation", "export",
                  "model_comparison", "weak_supervision")
_OFF = ("0", "off", "false", "no")


# kedro-mlflow's model class has an untyped ``predict``; MLflow warns about it when the class
# is defined (at import, on every kedro command). Not our code to fix, and a warnings filter
# cannot hide it: MLflow's wrapper resets the filters to "once" around the check.
_PREDICT_HINTS_WARNING = "Add type hints to the `predict` method"
# `log_torch_model` has to use pickle (see there); the warning saying so would greet every run.
_PICKLE_WARNING = "Saving pytorch model by Pickle or CloudPickle format"


def import_kedro_mlflow_quietly() -> None:
    """Import kedro-mlflow's model module with its type-hint warning dropped (only that
    message from that module; any other warning is shown as usual). Kedro then finds it
    imported when it loads the plugin's hooks."""
    import warnings

    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if not (category is UserWarning and _PREDICT_HINTS_WARNING in str(message)
                and filename.endswith("data_validation.py")):
            shown(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():  # restores showwarning on exit
        warnings.showwarning = show
        try:
            import kedro_mlflow.mlflow  # noqa: F401
        except ImportError:  # kedro-mlflow not installed: nothing to quieten
            pass


def untracked_pipelines() -> list[str]:
    """Pipelines kedro-mlflow must not track: all of them when INSTSEG_MLFLOW is off."""
    return list(PIPELINE_NAMES) if os.environ.get("INSTSEG_MLFLOW", "").lower() in _OFF else []


def project_tracking_uri() -> str:
    """``sqlite:///<project root>/mlflow.db``, wherever the command runs from (a notebook in
    notebooks/ must use the project's store, not create its own)."""
    from pathlib import Path

    from kedro.utils import find_kedro_project

    root = find_kedro_project(Path.cwd()) or Path.cwd()
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def _active_run():
    mlflow = sys.modules.get("mlflow")  # never import it just to find out there's no run
    return mlflow.active_run() if mlflow is not None else None


def active_mlflow():
    """The mlflow module when a run is active (kedro-mlflow tracks this pipeline), else None."""
    return sys.modules.get("mlflow") if _active_run() is not None else None


@contextlib.contextmanager
def nested_run(name: str, params: Mapping):
    """A nested MLflow run named ``name`` holding ``params`` (flat; values cut to 500
    characters) while the block runs; yields the run, or None when tracking is off."""
    mlflow = active_mlflow()
    if mlflow is None:
        yield None
        return
    with mlflow.start_run(run_name=name, nested=True) as run:
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        yield run


def active_run_id() -> str | None:
    """The id of the active MLflow run, None when tracking is off."""
    run = _active_run()
    return run.info.run_id if run is not None else None


def has_metric(name: str) -> bool:
    """Whether the active run already holds metric `name` (False without a run)."""
    run = _active_run()
    if run is None:
        return False
    from mlflow.tracking import MlflowClient

    return name in MlflowClient().get_run(run.info.run_id).data.metrics


class LiveMetrics:
    """A training callback ``fn(event, info)`` (`engine.callbacks.as_callback`) that logs
    to an MLflow run while training runs, from rank 0.

    Every step's history row becomes ``train/<column>`` points (step = the row's iteration,
    timestamp = when the step ended), sent with one ``log_batch`` every ``every`` steps
    together with ``train/images_per_s`` and ``train/iters_per_s`` of those steps;
    validation losses and model selection's AP go out at once as ``val/<name>`` (step =
    steps done). A background thread does the sending, so a slow store never holds a step
    up; ``train_end`` waits until all is sent. Holds only the run id and the store's URI
    (no client, no thread) when pickled, so a DDP worker can log too.
    """

    def __init__(self, run_id: str, tracking_uri: str, every: int | None):
        self.run_id, self.tracking_uri, self.every = run_id, tracking_uri, int(every or 0)
        self.pending: list = []
        self.logged = 0
        self._client = self._queue = None
        self._window: tuple[float, int] = (time.perf_counter(), 0)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None, "_queue": None}

    def __call__(self, event: str, info: dict) -> None:
        if info.get("rank", 0) != 0:
            return
        handler = getattr(self, f"_on_{event}", None)
        if handler is not None:
            handler(info)

    def _on_train_start(self, info: dict) -> None:
        self._window = (time.perf_counter(), 0)

    def _on_step_end(self, info: dict) -> None:
        row, stamp = info["losses"], int(time.time() * 1000)
        self._add({f"train/{k}": v for k, v in row.items() if k != "iteration"},
                  stamp, int(row["iteration"]))
        start, images = self._window
        self._window = (start, images + int(info.get("images", 0)))
        if self.every and info["iteration"] % self.every == 0:
            seconds = max(time.perf_counter() - start, 1e-9)
            self._add({"train/images_per_s": self._window[1] / seconds,
                       "train/iters_per_s": self.every / seconds}, stamp, info["iteration"])
            self._window = (time.perf_counter(), 0)
            self.flush()

    def _on_validation(self, info: dict) -> None:
        self._add({f"val/{k}": v for k, v in info["losses"].items()},
                  int(time.time() * 1000), info["iteration"])
        self.flush()

    def _on_evaluation(self, info: dict) -> None:
        self._add({f"val/{k}": v for k, v in info["metrics"].items()},
                  int(time.time() * 1000), info["iteration"])
        self.flush()

    def _on_train_end(self, info: dict) -> None:
        self.flush(wait=True)

    def _add(self, values: dict, stamp: int, step: int) -> None:
        from mlflow.entities import Metric

        self.pending += [Metric(k, float(v), stamp, step) for k, v in values.items()
                         if isinstance(v, (int, float)) and not pd.isna(v)]

    def flush(self, wait: bool = False) -> None:
        """Hand the pending points to the sending thread; ``wait``: until all are sent."""
        if self.pending:
            self._sender().put(self.pending)
            self.pending = []
        if wait and self._queue is not None:
            self._queue.join()

    def _sender(self):
        if self._queue is None:
            import queue
            import threading

            self._queue = queue.Queue()
            threading.Thread(target=self._send_forever, args=(self._queue,), daemon=True,
                             name="mlflow-live-metrics").start()
        return self._queue

    def _send_forever(self, batches) -> None:
        while True:
            metrics = batches.get()
            try:
                self._send(metrics)
            except Exception as exc:  # noqa: BLE001 - tracking must never stop training
                logger.warning("live MLflow logging of %d metric points failed: %s",
                               len(metrics), exc)
            finally:
                batches.task_done()

    def _send(self, metrics: list) -> None:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(self.tracking_uri)
        for start in range(0, len(metrics), 1000):  # MLflow caps a batch at 1000 metrics
            self._client.log_batch(self.run_id, metrics=metrics[start:start + 1000])
        self.logged += len(metrics)


def live_metrics(every: int | None) -> LiveMetrics | None:
    """A `LiveMetrics` on the active run, None when tracking is off."""
    run = _active_run()
    if run is None:
        return None
    import mlflow

    return LiveMetrics(run.info.run_id, mlflow.get_tracking_uri(), every)


def model_identity(path: str | None, version: str | None, model: dict) -> dict[str, str]:
    """Tags naming a trained model: its catalog version and file, the file's SHA-256, and
    the MLflow run that trained it (the ``mlflow_run_id`` the training node stored)."""
    import hashlib

    tags = {"model_version": version, "model_path": path,
            "training_run_id": (model or {}).get("mlflow_run_id")}
    if path is not None and os.path.isfile(path):
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        tags["model_sha256"] = digest.hexdigest()
    return {k: str(v) for k, v in tags.items() if v is not None}


def set_tags(tags: dict[str, str]) -> bool:
    """Set tags on the active run (no-op without one)."""
    if _active_run() is None or not tags:
        return False
    import mlflow

    mlflow.set_tags(tags)
    return True


def log_history(history: pd.DataFrame, prefix: str, step_column: str = "iteration") -> int:
    """Log every numeric column of ``history`` as ``{prefix}/{column}`` metrics by step."""
    run = _active_run()
    if run is None or history is None or len(history) == 0:
        return 0
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    now = int(time.time() * 1000)
    columns = [c for c in history.columns
               if c != step_column and pd.api.types.is_numeric_dtype(history[c])]
    metrics = [Metric(f"{prefix}/{c}", float(v), now, int(step))
               for c in columns for step, v in zip(history[step_column], history[c])
               if pd.notna(v)]
    client = MlflowClient()
    for start in range(0, len(metrics), 1000):  # MLflow caps a batch at 1000 metrics
        client.log_batch(run.info.run_id, metrics=metrics[start:start + 1000])
    return len(metrics)


def log_torch_model(model: dict) -> bool:
    """Log the rebuilt network as an MLflow pytorch model (pickle format: Mask R-CNN cannot
    go through torch.export, MLflow's default)."""
    if _active_run() is None:
        return False
    import mlflow.pytorch
    import torch
    import torchvision

    from instseg_pipeline.models import load_model

    network = load_model(model["config"], model["state_dict"]).eval()
    with _dropped_log_message("mlflow.pytorch", _PICKLE_WARNING):
        mlflow.pytorch.log_model(
            network, name="model", serialization_format="pickle",
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                              f"torchvision=={torchvision.__version__.split('+')[0]}"])
    mlflow.log_dict(model["config"], "model_config.json")
    return True


@contextlib.contextmanager
def _dropped_log_message(logger_name: str, prefix: str) -> Iterator[None]:
    """Drop records of `logger_name` whose message starts with `prefix`, for the block."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(prefix)

    target = logging.getLogger(logger_name)
    target.addFilter(keep)
    try:
        yield
    finally:
        target.removeFilter(keep)


def log_metrics(metrics: dict[str, float], step: int | None = None) -> bool:
    """Log scalar metrics (NaN and -1 "undefined" values skipped) to the active run."""
    if _active_run() is None:
        return False
    import math

    import mlflow

    clean = {k.replace("@", "_"): float(v) for k, v in metrics.items()
             if v is not None and not math.isnan(float(v)) and float(v) != -1.0}
    mlflow.log_metrics(clean, step=step)
    return True


def log_figure(figure, name: str) -> bool:
    """Log a matplotlib figure as an image artifact of the active run.

    (The catalog keeps the versioned PNG; kedro-mlflow's artifact wrapper cannot be used
    around versioned datasets with Kedro 1.x: it stamps its own save version.)
    """
    if _active_run() is None:
        return False
    import mlflow

    mlflow.log_figure(figure, f"figures/{name}")
    return True
