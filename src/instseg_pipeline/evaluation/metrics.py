"""Evaluation of a predictions table against the canonical tables (Kedro-free).

Ground truth is built from the tables once (`tables.tables_to_coco`), never by replaying
training transforms; crowd regions are COCO's "ignore" regions. Every function here first
checks the split's instances with `ground_truth.check_pseudo_masks`: pseudo-masks are
refused as ground truth unless ``allow_pseudo_masks`` (``evaluation.allow_pseudo_masks``).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from instseg_pipeline.data.sources.cityscapes import annotation_path
from instseg_pipeline.data.tables import select_split
from instseg_pipeline.evaluation.cityscapes import cityscapes_ap_from_tables, read_id_map
from instseg_pipeline.evaluation.coco import coco_eval_details
from instseg_pipeline.evaluation.ground_truth import check_pseudo_masks, coco_ground_truth
from instseg_pipeline.evaluation.matching import match_masks
from instseg_pipeline.evaluation.panoptic import panoptic_ground_truth as _panoptic_ground_truth
from instseg_pipeline.evaluation.panoptic import pq_from_predictions

logger = logging.getLogger(__name__)


def coco_metrics(images: pd.DataFrame, instances: pd.DataFrame, categories: pd.DataFrame,
                 predictions: pd.DataFrame, split: str, iou_types=("segm", "bbox"),
                 backend: str = "faster-coco-eval", allow_pseudo_masks: bool = False) -> dict:
    """``{iou_type: {12 stats, per_class_ap}}`` plus the arrays for plots under ``details``.

    `ground_truth.PseudoMaskError` when the split holds pseudo-masks and not
    ``allow_pseudo_masks``."""
    gt = coco_ground_truth(images, instances, categories, split, allow_pseudo_masks)
    out, arrays = {}, {}
    for iou_type in iou_types:
        details = coco_eval_details(gt, predictions, iou_type=iou_type, backend=backend)
        arrays[iou_type] = {k: details.pop(k) for k in ("precision", "recall")}
        out[iou_type] = {k: v for k, v in details.items() if not isinstance(v, np.ndarray)}
        logger.info("%s AP %.4f AP50 %.4f (%s)", iou_type, out[iou_type]["mAP"],
                    out[iou_type]["mAP_50"], backend)
    return {"metrics": out, "arrays": arrays}


def cityscapes_metrics(images: pd.DataFrame, instances: pd.DataFrame,
                       categories: pd.DataFrame, predictions: pd.DataFrame, split: str,
                       gtfine_root: str | None = None, min_region_size: int = 100,
                       allow_pseudo_masks: bool = False) -> dict:
    """Cityscapes instance-level AP / AP50 (`metrics.cityscapes`) of the split.

    With ``gtfine_root`` (the root of a ``cityscapes`` source) the ground truth is the gtFine
    instanceIds PNG of each image (official void and group regions); without it, the
    ``instances`` table, crowd regions counting as groups (pseudo-masks refused unless
    ``allow_pseudo_masks``).
    """
    ids = images.loc[images["split"] == split, "image_id"].tolist()
    if gtfine_root is None:
        check_pseudo_masks(select_split(images, instances, split)[1], allow_pseudo_masks,
                           split)
    gt_map = _gtfine_reader(gtfine_root) if gtfine_root is not None else None
    result = cityscapes_ap_from_tables(images, instances, categories, predictions, ids,
                                       gt_map=gt_map, min_region_size=min_region_size)
    logger.info("Cityscapes AP %s AP50 %s on %d %s images (ground truth: %s)",
                _fmt(result["AP"]), _fmt(result["AP50"]), len(ids), split,
                result["ground_truth"])
    return result


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _gtfine_reader(root: str):
    """images row -> its gtFine instanceIds map (the file the tables were built from)."""
    def read(image) -> np.ndarray:
        return read_id_map(annotation_path(Path(root), Path(root) / image.file_name,
                                           image.split))

    return read


def panoptic_metrics(images: pd.DataFrame, instances: pd.DataFrame,
                     stuff_segments: pd.DataFrame | None, categories: pd.DataFrame,
                     panoptic: dict, split: str, allow_pseudo_masks: bool = False) -> dict:
    """PQ / SQ / RQ of panoptic predictions (`evaluation.panoptic.pq_from_predictions`) on
    the ``split`` images: {"all", "things", "stuff"} each {"pq", "sq", "rq", "n"}, plus
    "per_category" keyed by the category id as a string (JSON keys). Pseudo-masks among
    the instances and stuff segments are refused unless ``allow_pseudo_masks``."""
    images, instances = select_split(images, instances, split)
    _check_panoptic(images, instances, stuff_segments, split, allow_pseudo_masks)
    result = pq_from_predictions(images, instances, stuff_segments, categories, panoptic)
    return {k: v for k, v in result.items() if k != "per_category"} | {
        "per_category": {str(k): v for k, v in result.get("per_category", {}).items()}}


def panoptic_ground_truth(images: pd.DataFrame, instances: pd.DataFrame,
                          stuff_segments: pd.DataFrame | None, categories: pd.DataFrame,
                          panoptic: dict, split: str, allow_pseudo_masks: bool = False) -> dict:
    """The ground truth `panoptic_metrics` scores ``panoptic`` against on the ``split``
    images, in the ``panoptic_predictions`` form (`evaluation.panoptic.panoptic_ground_truth`)."""
    images, instances = select_split(images, instances, split)
    _check_panoptic(images, instances, stuff_segments, split, allow_pseudo_masks)
    return _panoptic_ground_truth(images, instances, stuff_segments, categories, panoptic)


def _check_panoptic(images: pd.DataFrame, instances: pd.DataFrame,
                    stuff_segments: pd.DataFrame | None, split: str, allow: bool) -> None:
    """`check_pseudo_masks` on the split's instances and stuff segments together."""
    parts = [instances]
    if stuff_segments is not None and len(stuff_segments):
        parts.append(stuff_segments[stuff_segments["image_id"].isin(images["image_id"])])
    check_pseudo_masks(pd.concat(parts) if len(parts) > 1 else instances, allow, split)


def matched_mask_ious(images: pd.DataFrame, instances: pd.DataFrame,
                      predictions: pd.DataFrame, split: str, score_threshold: float = 0.5,
                      iou_threshold: float = 0.5,
                      allow_pseudo_masks: bool = False) -> pd.DataFrame:
    """One row per matched (prediction, non-crowd GT) pair: image_id, ids, IoU, GT area
    (pseudo-masks refused as GT unless ``allow_pseudo_masks``)."""
    images, instances = select_split(images, instances, split)
    check_pseudo_masks(instances, allow_pseudo_masks, split)
    instances = instances[~instances["iscrowd"].astype(bool)]
    confident = predictions[predictions["score"] >= score_threshold]
    rows = []
    for image in images.itertuples(index=False):
        gt = instances[instances["image_id"] == image.image_id]
        pred = confident[confident["image_id"] == image.image_id]
        if len(gt) == 0 or len(pred) == 0:
            continue
        size = [int(image.height), int(image.width)]
        match = match_masks([{"size": size, "counts": c} for c in pred["rle"]],
                            [{"size": size, "counts": c} for c in gt["rle"]],
                            scores=pred["score"].to_numpy(), iou_threshold=iou_threshold)
        for p, g, iou in zip(match.pred_index, match.gt_index, match.iou):
            rows.append({"image_id": int(image.image_id),
                         "prediction_id": int(pred["prediction_id"].iloc[p]),
                         "instance_id": int(gt["instance_id"].iloc[g]),
                         "pred_category_id": int(pred["category_id"].iloc[p]),
                         "gt_category_id": int(gt["category_id"].iloc[g]),
                         "iou": float(iou), "gt_area": int(gt["area"].iloc[g])})
    return pd.DataFrame(rows, columns=["image_id", "prediction_id", "instance_id",
                                       "pred_category_id", "gt_category_id", "iou", "gt_area"])
