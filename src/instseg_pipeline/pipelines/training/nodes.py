"""Training nodes. torch is imported inside the nodes: `kedro run --pipeline ingestion`
must not pay for it. Each node builds the typed configs once from its parameters."""
from __future__ import annotations

import logging

import pandas as pd

from instseg_pipeline.data.config import SourceConfig
from instseg_pipeline.engine.config import TrainingConfig
from instseg_pipeline.kedro_ext import tracking

logger = logging.getLogger(__name__)


def preview_augmentation(images: pd.DataFrame, instances: pd.DataFrame,
                         categories: pd.DataFrame, source: dict, training: dict):
    """A grid of augmented training samples with their masks and boxes."""
    from instseg_pipeline.engine.fit import build_datasets
    from instseg_pipeline.viz.training import augmentation_preview

    config = TrainingConfig.from_params(training)
    root = SourceConfig.from_params(source).root
    train, _ = build_datasets(images, instances, categories, root, config)
    figure = augmentation_preview(train, n=config.preview_samples, seed=config.seed)
    tracking.log_figure(figure, "augmentation_preview.png")
    return figure


def train_model(images: pd.DataFrame, instances: pd.DataFrame, categories: pd.DataFrame,
                source: dict, training: dict) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """Train on the train split; weights + rebuild config, loss history, val losses."""
    from instseg_pipeline.engine.fit import fit

    result = fit(images, instances, categories, SourceConfig.from_params(source).root,
                 TrainingConfig.from_params(training))
    if result["skipped_steps"]:
        logger.warning("%d steps skipped for non-finite losses", result["skipped_steps"])
    return result["model"], result["history"], result["val_history"]


def plot_training_curves(history: pd.DataFrame, val_history: pd.DataFrame):
    """Loss components and learning rate against iterations."""
    from instseg_pipeline.viz.training import training_curves

    figure = training_curves(history, val_history)
    tracking.log_figure(figure, "training_curves.png")
    return figure


def track_training(model: dict, history: pd.DataFrame, val_history: pd.DataFrame,
                   training: dict) -> None:
    """Log the loss history and the model to the active MLflow run, if tracking is on."""
    tracking.log_history(history, prefix="train")
    tracking.log_history(val_history, prefix="val", step_column="iteration")
    if TrainingConfig.from_params(training).log_model_to_mlflow:
        tracking.log_torch_model(model)
