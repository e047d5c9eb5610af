"""Model comparison nodes: thin adapters over `instseg_pipeline.comparison`. Each compared
model trains and is evaluated in an MLflow run of its own, nested under the pipeline's run
(which kedro-mlflow opens); the table and the figure go to the pipeline's run. torch is
imported inside `comparison`'s functions."""
from __future__ import annotations

import logging
from collections.abc import Mapping

import pandas as pd

from instseg_pipeline.comparison import compare
from instseg_pipeline.comparison.config import ModelComparisonConfig
from instseg_pipeline.config_schema import as_dict
from instseg_pipeline.data.config import SourceConfig
from instseg_pipeline.engine.config import TrainingConfig
from instseg_pipeline.evaluation.config import EvaluationConfig
from instseg_pipeline.export.config import ExportConfig
from instseg_pipeline.kedro_ext import tracking

logger = logging.getLogger(__name__)
METRICS = ("mAP", "mAP_50", "mAP_75", "box_mAP", "fps", "fps_onnx", "params", "train_seconds")


def _flat(params: Mapping, prefix: str = "") -> dict:
    out = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def model_run(name: str, params: Mapping):
    """`tracking.nested_run` of one model: ``params`` flattened to dotted keys."""
    return tracking.nested_run(name, _flat(params))


def _run_params(training: dict) -> dict:
    """What a model's run records: its model block resolved with its family's settings,
    and the shared budget."""
    from instseg_pipeline.models import family_params

    config = TrainingConfig.from_params(training)  # an override's typo fails here, by name
    return {"model": family_params(config.model, config.families),
            "training": {"max_iters": config.max_iters, "batch_size": config.batch_size,
                         "optimizer": training.get("optimizer", {}),
                         "scheduler": training.get("scheduler", {})}}


def compare_models(images: pd.DataFrame, instances: pd.DataFrame, categories: pd.DataFrame,
                   stuff_segments: pd.DataFrame, source: dict, training: dict,
                   evaluation: dict, export: dict, model_comparison: dict) -> pd.DataFrame:
    """Train, evaluate and time every model of ``model_comparison.models``; one row each."""
    config = ModelComparisonConfig.from_params(model_comparison)
    compare.check_models(config.models)
    compare.check_models(config.overrides, where="overrides.{name}")
    budgets = {name: compare.training_params(training, name, config.overrides.get(name))
               for name in config.models}
    recorded = {name: _run_params(params) for name, params in budgets.items()}
    evaluation_config, export_config = (EvaluationConfig.from_params(evaluation),
                                        ExportConfig.from_params(export))
    root = SourceConfig.from_params(source).root
    rows = []
    for index, name in enumerate(config.models, start=1):
        logger.info("model comparison %d/%d: %s", index, len(config.models), name)
        with model_run(name, recorded[name]) as run:
            row, result = compare.compare_model(
                name, images, instances, categories, root, budgets[name], evaluation_config,
                config.speed, export_config.opset, as_dict(export_config.session),
                stuff_segments=stuff_segments)
            if run is not None:
                _track_model(row, result)
        rows.append(row)
    table = compare.comparison_table(rows)
    mlflow = tracking.active_mlflow()
    if mlflow is not None:
        mlflow.log_text(table.to_csv(index=False), "model_comparison.csv")
    return table


def _track_model(row: dict, result: dict) -> None:
    """The model's metrics, loss history and ONNX note, in its own (active) run."""
    tracking.log_history(result["history"], prefix="train")
    tracking.log_history(result["val_history"], prefix="val")
    tracking.log_metrics({k: row[k] for k in METRICS})
    tracking.active_mlflow().set_tags({"backbone": row["backbone"],
                        "onnx_note": (row["onnx_note"] or "ok")[:1000]})


def plot_model_comparison(model_comparison: pd.DataFrame):
    """Mask AP against images/s, eager and ONNX markers, one labelled point per model."""
    from instseg_pipeline.comparison.plot import comparison_plot

    figure = comparison_plot(model_comparison)
    tracking.log_figure(figure, "model_comparison.png")
    return figure
