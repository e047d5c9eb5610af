"""Weak supervision nodes: thin adapters over `instseg_pipeline.comparison.mask_quality`
and `instseg_pipeline.comparison.weak_supervision`. Each variant trains and is evaluated in
an MLflow run of its own, nested under the pipeline's run (which kedro-mlflow opens); the
reports and figures go to the pipeline's run. torch is imported inside `comparison`'s
functions."""
from __future__ import annotations

import json
import logging

import pandas as pd

from instseg_pipeline.comparison import mask_quality
from instseg_pipeline.comparison import weak_supervision as weak
from instseg_pipeline.comparison.weak_config import WeakSupervisionConfig
from instseg_pipeline.data.config import SourceConfig
from instseg_pipeline.evaluation.config import EvaluationConfig
from instseg_pipeline.kedro_ext import tracking

logger = logging.getLogger(__name__)


def measure_pseudo_mask_quality(images: pd.DataFrame, instances: pd.DataFrame,
                                categories: pd.DataFrame, source: dict,
                                weak_supervision: dict) -> dict:
    """IoU of each method's pseudo-masks from boxes with the annotated masks, on a seeded
    sample of annotated instances: overall, per category, per COCO size, fallbacks."""
    config = WeakSupervisionConfig.from_params(weak_supervision)
    configs = {m: config.pseudo_mask_config(m) for m in config.quality_methods()}
    report = mask_quality.quality_report(images, instances, categories,
                                         SourceConfig.from_params(source).root, configs,
                                         config.max_instances, config.seed)
    logger.info("pseudo-mask quality (IoU with the annotated mask):\n%s",
                mask_quality.quality_table(report))
    tracking.log_metrics(_iou_metrics(report))
    return report


def _iou_metrics(report: dict) -> dict:
    """``pseudo_iou/<method>`` and ``pseudo_iou/<method>/<size>``: mean IoUs to track."""
    out = {}
    for method, stats in report["methods"].items():
        out[f"pseudo_iou/{method}"] = stats["mean_iou"]
        out.update({f"pseudo_iou/{method}/{size}": stats["by_size"][size]["mean_iou"]
                    for size in mask_quality.SIZES})
    return out


def plot_pseudo_mask_quality(pseudo_mask_quality: dict):
    """Mean IoU per method and COCO size, as grouped bars."""
    figure = mask_quality.quality_plot(pseudo_mask_quality)
    tracking.log_figure(figure, "pseudo_mask_quality.png")
    return figure


def compare_weak_supervision(images: pd.DataFrame, instances: pd.DataFrame,
                             categories: pd.DataFrame, stuff_segments: pd.DataFrame,
                             source: dict, training: dict, evaluation: dict,
                             weak_supervision: dict) -> list[dict]:
    """Train one model per variant (full, box, grabcut, mixed) at the same budget and
    evaluate each on the same val split against the annotated masks; one row each."""
    config = WeakSupervisionConfig.from_params(weak_supervision)
    weak.check_annotated(instances)
    root, evaluation_config = (SourceConfig.from_params(source).root,
                               EvaluationConfig.from_params(evaluation))
    budgets = {variant: weak.variant_training_params(training, variant, config.budget,
                                                     config.pseudo_mask_loss_weight)
               for variant in config.variants}
    # every variant's masks before any training: a pseudo-mask problem shows at once
    tables = {variant: weak.variant_instances(variant, images, instances, root, config)
              for variant in config.variants}
    rows = []
    for index, (variant, train_instances) in enumerate(tables.items(), start=1):
        logger.info("weak supervision comparison %d/%d: %s", index, len(tables), variant)
        params = budgets[variant]
        with tracking.nested_run(variant, _recorded(variant, params, config)) as run:
            row, result = weak.train_and_evaluate(
                variant, images, train_instances, instances, categories, root, params,
                evaluation_config, stuff_segments=stuff_segments)
            if run is not None:
                tracking.log_history(result["history"], prefix="train")
                tracking.log_metrics({k: row[k] for k in weak.METRICS})
        rows.append(row)
    table = weak.comparison_rows(rows)
    markdown = weak.comparison_table(table)
    logger.info("weak supervision comparison (val split, annotated masks):\n%s", markdown)
    mlflow = tracking.active_mlflow()
    if mlflow is not None:
        mlflow.log_text(markdown, "weak_supervision_comparison.md")
        mlflow.log_text(json.dumps(table, indent=1), "weak_supervision_comparison.json")
    return table


def _recorded(variant: str, params: dict, config: WeakSupervisionConfig) -> dict:
    """What a variant's MLflow run records: its masks and the shared budget."""
    return {"variant": variant, "method": weak.variant_method(variant),
            "mixed_full_fraction": config.mixed_full_fraction,
            "model.name": (params.get("model") or {}).get("name"),
            "max_iters": params["max_iters"], "time_budget_min": params["time_budget_min"],
            "batch_size": params.get("batch_size"),
            "pseudo_mask_loss_weight": params.get("pseudo_mask_loss_weight")}


def plot_weak_supervision_comparison(weak_supervision_comparison: list[dict]):
    """Mask AP, AP50, AP75 and box AP per variant, as grouped bars."""
    figure = weak.comparison_plot(weak_supervision_comparison)
    tracking.log_figure(figure, "weak_supervision_comparison.png")
    return figure
