"""Evaluation nodes: thin adapters over `instseg_pipeline.evaluation`, `predict` and `viz`;
each builds the typed `EvaluationConfig` once from its parameters."""
from __future__ import annotations

import logging

import pandas as pd

from instseg_pipeline.data.config import SourceConfig
from instseg_pipeline.data.tables import label_mapping
from instseg_pipeline.evaluation import metrics as evaluation
from instseg_pipeline.evaluation.config import EvaluationConfig
from instseg_pipeline.evaluation.pixels import pixel_metrics
from instseg_pipeline.kedro_ext import tracking

logger = logging.getLogger(__name__)


def predict(model: dict, images: pd.DataFrame, categories: pd.DataFrame, source: dict,
            params: dict) -> pd.DataFrame:
    """Run the trained model on the evaluated split; one row per predicted instance."""
    from instseg_pipeline.models import load_model
    from instseg_pipeline.predict.batch import predict_images

    config = EvaluationConfig.from_params(params)
    network = load_model(model["config"], model["state_dict"])
    to_category = {label: cat for cat, label in label_mapping(categories).items()}
    split = images[images["split"] == config.split]
    return predict_images(network, split, SourceConfig.from_params(source).root, to_category,
                          batch_size=config.batch_size, device=config.device,
                          score_threshold=config.score_threshold,
                          mask_threshold=config.mask_threshold)


def compute_coco_metrics(images: pd.DataFrame, instances: pd.DataFrame,
                         categories: pd.DataFrame, predictions: pd.DataFrame,
                         params: dict) -> tuple[dict, dict]:
    """Mask and box AP (12 COCO stats each, per-class AP) and the PR arrays for plots;
    ``pixel``: pixel accuracy and mean mask IoU at ``match_score_threshold``
    (`evaluation.pixels.pixel_metrics` says what each means)."""
    config = EvaluationConfig.from_params(params)
    result = evaluation.coco_metrics(images, instances, categories, predictions,
                                     config.split, config.iou_types, config.backend,
                                     allow_pseudo_masks=config.allow_pseudo_masks)
    result["metrics"]["pixel"] = pixel_metrics(images, instances, predictions, config.split,
                                               score_threshold=config.match_score_threshold,
                                               allow_pseudo_masks=config.allow_pseudo_masks)
    tracking.log_metrics({f"{t}/{k}": v for t, stats in result["metrics"].items()
                          for k, v in stats.items() if isinstance(v, float)})
    return result["metrics"], result["arrays"]


def predict_panoptic(model: dict, images: pd.DataFrame, categories: pd.DataFrame,
                     predictions: pd.DataFrame, source: dict, params: dict) -> dict:
    """COCO panoptic predictions of the evaluated split: the things of ``predictions`` and,
    for a semantic family, the stuff of its semantic map (run here), combined by
    `predict.panoptic.combine_panoptic`."""
    from instseg_pipeline.predict.panoptic import panoptic_outputs

    config = EvaluationConfig.from_params(params)
    panoptic = config.panoptic
    split = images[images["split"] == config.split]
    options = {"score_threshold": panoptic.score_threshold,
               "overlap_threshold": panoptic.overlap_threshold,
               "min_area": panoptic.min_area, "stuff_min_area": panoptic.stuff_min_area}
    stuff = _stuff_category_ids(model)
    maps = None if stuff is None else _semantic_maps(model, split, source, config)
    return panoptic_outputs(split, predictions, categories, maps, stuff, **options)


def _stuff_category_ids(model: dict) -> dict[int, int] | None:
    """{semantic label: stuff category id} of a semantic family's model; None for other
    families and for one trained on a source without stuff (nothing to add to its things)."""
    from instseg_pipeline.models import family

    name = model["config"]["name"]
    if not family(name).semantic:
        return None
    if model.get("stuff_category_ids") is None:
        raise ValueError(f"model {name} is of a semantic family but its model file has no "
                         "stuff_category_ids")
    if not model["stuff_category_ids"]:
        logger.info("model %s learnt no stuff categories: panoptic output of things only", name)
        return None
    return {int(k): int(v) for k, v in model["stuff_category_ids"].items()}


def _semantic_maps(model: dict, images: pd.DataFrame, source: dict, config: EvaluationConfig):
    from instseg_pipeline.models import load_model
    from instseg_pipeline.predict.batch import semantic_maps

    network = load_model(model["config"], model["state_dict"])
    return semantic_maps(network, images, SourceConfig.from_params(source).root,
                         batch_size=config.batch_size, device=config.device)


def compute_pq_metrics(images: pd.DataFrame, instances: pd.DataFrame,
                       stuff_segments: pd.DataFrame, categories: pd.DataFrame,
                       panoptic_predictions: dict, params: dict) -> dict:
    """Panoptic quality of ``panoptic_predictions``: things, and stuff when the model
    predicts stuff (an instance model's stuff group has n = 0)."""
    config = EvaluationConfig.from_params(params)
    result = evaluation.panoptic_metrics(images, instances, stuff_segments, categories,
                                         panoptic_predictions, config.split,
                                         allow_pseudo_masks=config.allow_pseudo_masks)
    # an instance model scores no stuff: a 0 logged for it would read as a score
    groups = [g for g in ("all", "things", "stuff") if g != "stuff" or result[g]["n"]]
    tracking.log_metrics({f"{name}/{group}": result[group][name] for group in groups
                          for name in ("pq", "sq", "rq")})
    return result


def write_panoptic_ground_truth(images: pd.DataFrame, instances: pd.DataFrame,
                                stuff_segments: pd.DataFrame, categories: pd.DataFrame,
                                panoptic_predictions: dict, params: dict) -> dict:
    """The ground truth ``pq_metrics`` scores ``panoptic_predictions`` against, saved as COCO
    panoptic files: ``instseg-eval panoptic --gt-dir <it> --pred-dir <the predictions>``
    reproduces ``pq_metrics``."""
    config = EvaluationConfig.from_params(params)
    return evaluation.panoptic_ground_truth(images, instances, stuff_segments, categories,
                                            panoptic_predictions, config.split,
                                            allow_pseudo_masks=config.allow_pseudo_masks)


def compute_cityscapes_metrics(images: pd.DataFrame, instances: pd.DataFrame,
                               categories: pd.DataFrame, predictions: pd.DataFrame,
                               source: dict, params: dict) -> dict:
    """Cityscapes-style AP and AP50 (official gtFine ground truth on the cityscapes env)."""
    config, source_config = EvaluationConfig.from_params(params), SourceConfig.from_params(source)
    gtfine_root = source_config.root if source_config.type == "cityscapes" else None
    result = evaluation.cityscapes_metrics(
        images, instances, categories, predictions, config.split, gtfine_root=gtfine_root,
        min_region_size=config.cityscapes.min_region_size,
        allow_pseudo_masks=config.allow_pseudo_masks)
    tracking.log_metrics({f"cityscapes/{k}": result[k] for k in ("AP", "AP50")
                          if result[k] is not None})
    return result


def compute_mask_ious(images: pd.DataFrame, instances: pd.DataFrame,
                      predictions: pd.DataFrame, params: dict) -> pd.DataFrame:
    """Matched (prediction, GT) pairs with their mask IoU: mask quality and confusions."""
    config = EvaluationConfig.from_params(params)
    return evaluation.matched_mask_ious(images, instances, predictions, config.split,
                                        score_threshold=config.match_score_threshold,
                                        allow_pseudo_masks=config.allow_pseudo_masks)


def _val_ids(images: pd.DataFrame, config: EvaluationConfig) -> list[int]:
    ids = images.loc[images["split"] == config.split, "image_id"].tolist()
    return ids[: config.figures.suite_images]


def plot_visualisation_suite(images: pd.DataFrame, instances: pd.DataFrame,
                             categories: pd.DataFrame, predictions: pd.DataFrame,
                             source: dict, params: dict):
    """Original | GT | predictions | semantic merge for a sample of evaluated images."""
    from instseg_pipeline.viz.suite import visualisation_suite

    config = EvaluationConfig.from_params(params)
    figure = visualisation_suite(images, instances, categories, predictions,
                                 SourceConfig.from_params(source).root, _val_ids(images, config),
                                 config.match_score_threshold)
    tracking.log_figure(figure, "visualisation_suite.png")
    return figure


def plot_panoptic_overlay(images: pd.DataFrame, instances: pd.DataFrame,
                          stuff_segments: pd.DataFrame, categories: pd.DataFrame,
                          panoptic_predictions: dict, source: dict, params: dict):
    """Image | ground-truth panoptic | predicted panoptic for the first evaluated images."""
    from instseg_pipeline.viz.panoptic import panoptic_overlay

    config = EvaluationConfig.from_params(params)
    ids = images.loc[images["split"] == config.split, "image_id"].tolist()
    figure = panoptic_overlay(images, instances, stuff_segments, categories,
                              panoptic_predictions, SourceConfig.from_params(source).root,
                              ids[: config.figures.panoptic])
    tracking.log_figure(figure, "panoptic_overlay.png")
    return figure


def plot_performance_dashboard(coco_metrics: dict, pr_arrays: dict, pq_metrics: dict,
                               matched: pd.DataFrame, history: pd.DataFrame,
                               val_history: pd.DataFrame, categories: pd.DataFrame,
                               predictions: pd.DataFrame, images: pd.DataFrame,
                               instances: pd.DataFrame, source: dict, params: dict):
    """AP breakdown, per-class AP, PQ / SQ / RQ, PR curves, IoU and size analysis,
    confusions, curves."""
    from instseg_pipeline.viz.dashboard import performance_dashboard

    config = EvaluationConfig.from_params(params)
    figure = performance_dashboard(coco_metrics, pr_arrays, matched, history, val_history,
                                   categories, predictions, images, instances,
                                   SourceConfig.from_params(source).root,
                                   score_threshold=config.match_score_threshold,
                                   split=config.split, pq_metrics=pq_metrics)
    tracking.log_figure(figure, "performance_dashboard.png")
    return figure


def plot_error_analysis(images: pd.DataFrame, instances: pd.DataFrame,
                        categories: pd.DataFrame, predictions: pd.DataFrame,
                        matched: pd.DataFrame, source: dict, params: dict):
    """Worst and best images, false-positive and false-negative galleries."""
    from instseg_pipeline.viz import galleries

    config = EvaluationConfig.from_params(params)
    args = (images, instances, categories, predictions, matched,
            SourceConfig.from_params(source).root)
    options = {"score_threshold": config.match_score_threshold, "split": config.split}
    gallery = config.figures.gallery
    figures = (galleries.worst_and_best_images(*args, n=config.figures.worst_best, **options),
               galleries.false_positive_gallery(*args, n=gallery, **options),
               galleries.false_negative_gallery(*args, n=gallery, **options))
    for figure, name in zip(figures, ("worst_and_best", "false_positives", "false_negatives")):
        tracking.log_figure(figure, f"{name}.png")
    return figures
