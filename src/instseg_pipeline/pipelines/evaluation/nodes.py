"""Evaluation nodes: thin adapters over `instseg_pipeline.evaluation` and `inference`."""
from __future__ import annotations

import logging

import pandas as pd

from instseg_pipeline.data.tables import label_mapping
from instseg_pipeline.evaluation import metrics as evaluation
from instseg_pipeline.kedro_ext import tracking

logger = logging.getLogger(__name__)


def predict(model: dict, images: pd.DataFrame, categories: pd.DataFrame, source: dict,
            params: dict) -> pd.DataFrame:
    """Run the trained model on the evaluated split; one row per predicted instance."""
    from instseg_pipeline.models import load_model
    from instseg_pipeline.predict.batch import predict_images

    network = load_model(model["config"], model["state_dict"])
    to_category = {label: cat for cat, label in label_mapping(categories).items()}
    split = images[images["split"] == params["split"]]
    return predict_images(network, split, source["root"], to_category,
                          batch_size=int(params.get("batch_size", 4)),
                          device=params.get("device", "auto"),
                          score_threshold=float(params["score_threshold"]),
                          mask_threshold=float(params["mask_threshold"]))


def compute_coco_metrics(images: pd.DataFrame, instances: pd.DataFrame,
                         categories: pd.DataFrame, predictions: pd.DataFrame,
                         params: dict) -> tuple[dict, dict]:
    """Mask and box AP (12 COCO stats each, per-class AP) and the PR arrays for plots."""
    result = evaluation.coco_metrics(images, instances, categories, predictions,
                                     params["split"], params["iou_types"], params["backend"])
    tracking.log_metrics({f"{t}/{k}": v for t, stats in result["metrics"].items()
                          for k, v in stats.items() if isinstance(v, float)})
    return result["metrics"], result["arrays"]


def compute_pq_metrics(images: pd.DataFrame, instances: pd.DataFrame,
                       categories: pd.DataFrame, predictions: pd.DataFrame,
                       params: dict) -> dict:
    """Things-only panoptic quality of the predictions (overlaps resolved by score)."""
    result = evaluation.panoptic_metrics(images, instances, categories, predictions,
                                         params["split"], **params["panoptic"])
    tracking.log_metrics({f"pq/{group}": result[group]["pq"] for group in ("all", "things")})
    return result


def compute_cityscapes_metrics(images: pd.DataFrame, instances: pd.DataFrame,
                               categories: pd.DataFrame, predictions: pd.DataFrame,
                               source: dict, params: dict) -> dict:
    """Cityscapes-style AP and AP50 (official gtFine ground truth on the cityscapes env)."""
    result = evaluation.cityscapes_metrics(
        images, instances, categories, predictions, params["split"], source,
        min_region_size=int(params.get("cityscapes", {}).get("min_region_size", 100)))
    tracking.log_metrics({f"cityscapes/{k}": result[k] for k in ("AP", "AP50")
                          if result[k] is not None})
    return result


def compute_mask_ious(images: pd.DataFrame, instances: pd.DataFrame,
                      predictions: pd.DataFrame, params: dict) -> pd.DataFrame:
    """Matched (prediction, GT) pairs with their mask IoU: mask quality and confusions."""
    return evaluation.matched_mask_ious(images, instances, predictions, params["split"],
                                        score_threshold=float(params["match_score_threshold"]))


def _val_ids(images: pd.DataFrame, params: dict) -> list[int]:
    ids = images.loc[images["split"] == params["split"], "image_id"].tolist()
    return ids[: int(params["figures"]["suite_images"])]


def plot_visualisation_suite(images: pd.DataFrame, instances: pd.DataFrame,
                             categories: pd.DataFrame, predictions: pd.DataFrame,
                             source: dict, params: dict):
    """Original | GT | predictions | semantic merge for a sample of evaluated images."""
    from instseg_pipeline.viz.evaluation import visualisation_suite

    figure = visualisation_suite(images, instances, categories, predictions, source["root"],
                                 _val_ids(images, params), params["match_score_threshold"])
    tracking.log_figure(figure, "visualisation_suite.png")
    return figure


def plot_performance_dashboard(coco_metrics: dict, pr_arrays: dict, matched: pd.DataFrame,
                               history: pd.DataFrame, val_history: pd.DataFrame,
                               categories: pd.DataFrame, predictions: pd.DataFrame,
                               images: pd.DataFrame, instances: pd.DataFrame, source: dict,
                               params: dict):
    """AP breakdown, per-class AP, PR curves, IoU and size analysis, confusions, curves."""
    from instseg_pipeline.viz.evaluation import performance_dashboard

    figure = performance_dashboard(coco_metrics, pr_arrays, matched, history, val_history,
                                   categories, predictions, images, instances, source["root"],
                                   score_threshold=params["match_score_threshold"],
                                   split=params["split"])
    tracking.log_figure(figure, "performance_dashboard.png")
    return figure


def plot_error_analysis(images: pd.DataFrame, instances: pd.DataFrame,
                        categories: pd.DataFrame, predictions: pd.DataFrame,
                        matched: pd.DataFrame, source: dict, params: dict):
    """Worst and best images, false-positive and false-negative galleries."""
    from instseg_pipeline.viz.overlays import evaluation as viz

    args = (images, instances, categories, predictions, matched, source["root"])
    options = {"score_threshold": params["match_score_threshold"], "split": params["split"]}
    figures = (viz.worst_and_best_images(*args, n=int(params["figures"]["worst_best"]),
                                         **options),
               viz.false_positive_gallery(*args, n=int(params["figures"]["gallery"]), **options),
               viz.false_negative_gallery(*args, n=int(params["figures"]["gallery"]), **options))
    for figure, name in zip(figures, ("worst_and_best", "false_positives", "false_negatives")):
        tracking.log_figure(figure, f"{name}.png")
    return figures
