"""Training nodes. torch is imported inside the nodes: `kedro run --pipelines ingestion`
must not pay for it. Each node builds the typed configs once from its parameters."""
from __future__ import annotations

import logging

import pandas as pd

from instseg_pipeline.data.config import SourceConfig
from instseg_pipeline.engine.config import TrainingConfig
from instseg_pipeline.kedro_ext import tracking

logger = logging.getLogger(__name__)


def preview_augmentation(images: pd.DataFrame, instances: pd.DataFrame,
                         categories: pd.DataFrame, stuff_segments: pd.DataFrame, source: dict,
                         training: dict):
    """A grid of augmented training samples with their masks and boxes (``stuff_segments``:
    read by semantic families, empty for instance sources)."""
    from instseg_pipeline.engine.fit import build_datasets
    from instseg_pipeline.viz.training import augmentation_preview

    config = TrainingConfig.from_params(training)
    root = SourceConfig.from_params(source).root
    train, _ = build_datasets(images, instances, categories, root, config, stuff_segments)
    figure = augmentation_preview(train, n=config.preview_samples, seed=config.seed)
    tracking.log_figure(figure, "augmentation_preview.png")
    return figure


def train_model(images: pd.DataFrame, instances: pd.DataFrame, categories: pd.DataFrame,
                stuff_segments: pd.DataFrame, source: dict, training: dict
                ) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """Train on the train split; weights + rebuild config, loss history, val losses.

    ``stuff_segments`` (empty for instance sources) gives a semantic family its stuff
    targets; its model dict then also names the stuff classes (`engine.fit.fit`).

    Losses, lr, speed and validation results reach MLflow while the run goes (tracking on)
    and TensorBoard (``training.tensorboard``); the model remembers its MLflow run.
    """
    from instseg_pipeline.engine.fit import fit
    from instseg_pipeline.engine.tensorboard import tensorboard_logger

    config, root = TrainingConfig.from_params(training), SourceConfig.from_params(source).root
    run_id = tracking.active_run_id()
    callbacks = [c for c in (tracking.live_metrics(config.log_every),
                             tensorboard_logger(config, images, root, run_id)) if c]
    result = fit(images, instances, categories, root, config, callbacks=callbacks,
                 stuff_segments=stuff_segments)
    if result["skipped_steps"]:
        logger.warning("%d steps skipped for non-finite losses", result["skipped_steps"])
    model = {**result["model"], "mlflow_run_id": run_id} if run_id else result["model"]
    return model, result["history"], result["val_history"]


def plot_training_curves(history: pd.DataFrame, val_history: pd.DataFrame):
    """Loss components and learning rate against iterations."""
    from instseg_pipeline.viz.training import training_curves

    figure = training_curves(history, val_history)
    tracking.log_figure(figure, "training_curves.png")
    return figure


def track_training(model: dict, history: pd.DataFrame, val_history: pd.DataFrame,
                   training: dict) -> None:
    """Log the model to the active MLflow run, if tracking is on, and the loss history
    unless training logged it live (a run of this node alone, on a saved model)."""
    if not tracking.has_metric("train/loss"):
        tracking.log_history(history, prefix="train")
        tracking.log_history(val_history, prefix="val", step_column="iteration")
    if TrainingConfig.from_params(training).log_model_to_mlflow:
        tracking.log_torch_model(model)
