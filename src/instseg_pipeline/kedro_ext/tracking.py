"""MLflow logging that is a no-op when tracking is off (no active run).

kedro-mlflow opens the run and logs parameters; this module adds what only the project
knows: per-iteration losses and the trained model. Tracking is switched off for every
pipeline with ``INSTSEG_MLFLOW=off`` (see conf/base/mlflow.yml).
"""
from __future__ import annotations

import logging
import os
import sys

import pandas as pd

logger = logging.getLogger(__name__)

PIPELINE_NAMES = ("__default__", "synthetic", "ingestion", "training", "evaluation", "export")
_OFF = ("0", "off", "false", "no")


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


def log_history(history: pd.DataFrame, prefix: str, step_column: str = "iteration") -> int:
    """Log every numeric column of ``history`` as ``{prefix}/{column}`` metrics by step."""
    run = _active_run()
    if run is None or history is None or len(history) == 0:
        return 0
    import time

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
    mlflow.pytorch.log_model(
        network, name="model", serialization_format="pickle",
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                          f"torchvision=={torchvision.__version__.split('+')[0]}"])
    mlflow.log_dict(model["config"], "model_config.json")
    return True


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
