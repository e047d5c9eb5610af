"""Pixel-level summaries of a predictions table: pixel accuracy and mean mask IoU.

Both read the predictions the way a user sees them, at one score threshold (the
evaluation's ``match_score_threshold``), unlike AP which sweeps every score.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from instseg_pipeline.data.masks import decode_strings
from instseg_pipeline.data.tables import select_split
from instseg_pipeline.evaluation.ground_truth import check_pseudo_masks
from instseg_pipeline.evaluation.metrics import matched_mask_ious

logger = logging.getLogger(__name__)

BACKGROUND = 0
IGNORED = -1  # crowd pixels of the ground truth: neither right nor wrong


def semantic_map(frame: pd.DataFrame, height: int, width: int,
                 value: str = "category_id") -> np.ndarray:
    """int64 [H, W]: each row's mask painted with its ``value`` in table order (later rows
    on top), `BACKGROUND` where no mask is."""
    out = np.full((height, width), BACKGROUND, np.int64)
    masks = decode_strings([str(c) for c in frame["rle"]], height, width).astype(bool)
    for mask, label in zip(masks, frame[value]):
        out[mask] = int(label)
    return out


def ground_truth_map(instances: pd.DataFrame, height: int, width: int) -> np.ndarray:
    """int64 [H, W] category map of one image's instances: the larger instances first so a
    small object on top of a large one keeps its pixels; crowd regions are `IGNORED`."""
    crowd = instances["iscrowd"].astype(bool)
    things = instances[~crowd].sort_values("area", ascending=False, kind="stable")
    out = semantic_map(things, height, width)
    crowds = instances[crowd]
    if len(crowds):
        out[semantic_map(crowds.assign(ignored=1), height, width, "ignored") == 1] = IGNORED
    return out


def prediction_map(predictions: pd.DataFrame, height: int, width: int,
                   score_threshold: float) -> np.ndarray:
    """int64 [H, W] category map of one image's predictions scoring >= ``score_threshold``;
    where masks overlap the higher score wins (it is painted last)."""
    confident = predictions[predictions["score"] >= score_threshold]
    return semantic_map(confident.sort_values("score", kind="stable"), height, width)


def pixel_metrics(images: pd.DataFrame, instances: pd.DataFrame, predictions: pd.DataFrame,
                  split: str, score_threshold: float = 0.5,
                  iou_threshold: float = 0.5, allow_pseudo_masks: bool = False) -> dict:
    """Pixel accuracy and mean mask IoU of ``predictions`` on the ``split`` images.

    pixel_accuracy: the predictions scoring >= ``score_threshold`` make a semantic map per
        image (category id per pixel, 0 = background, the higher score on overlaps); the
        ground truth map is the non-crowd instances' categories (0 = background). It is the
        fraction of all the split's pixels, pooled over images, where the two maps agree;
        pixels under a crowd region are left out. Background counts like any class.
    mean_mask_iou: every non-crowd ground-truth instance of the split gets the mask IoU of
        the prediction it is matched to (one-to-one, IoU >= ``iou_threshold``, predictions
        scoring >= ``score_threshold``, categories ignored; the pairs of
        `metrics.matched_mask_ious`), or 0 when unmatched; the mean over those instances.
    matched_mean_iou: the mean IoU over the matched pairs only (how good a found mask is).

    Returns those three (None when undefined: no pixels, no ground truth, no match) and the
    counts ``images``, ``gt_instances`` and ``matched``. Pseudo-masks are refused as ground
    truth unless ``allow_pseudo_masks`` (`ground_truth.check_pseudo_masks`).
    """
    images, instances = select_split(images, instances, split)
    check_pseudo_masks(instances, allow_pseudo_masks, split)
    agree = counted = 0
    for image in images.itertuples(index=False):
        height, width = int(image.height), int(image.width)
        truth = ground_truth_map(instances[instances["image_id"] == image.image_id],
                                 height, width)
        predicted = prediction_map(predictions[predictions["image_id"] == image.image_id],
                                   height, width, score_threshold)
        # pooled counts, so a large image weighs by its pixels (the per-image figure is
        # `matching.pixel_accuracy(predicted, truth, ignore_index=IGNORED)`)
        valid = truth != IGNORED
        agree += int((predicted[valid] == truth[valid]).sum())
        counted += int(valid.sum())
    matched = matched_mask_ious(images, instances, predictions, split, score_threshold,
                                iou_threshold, allow_pseudo_masks)
    gt_count = int((~instances["iscrowd"].astype(bool)).sum())
    result = {"pixel_accuracy": agree / counted if counted else None,
              "mean_mask_iou": float(matched["iou"].sum()) / gt_count if gt_count else None,
              "matched_mean_iou": float(matched["iou"].mean()) if len(matched) else None,
              "images": len(images), "gt_instances": gt_count, "matched": len(matched)}
    logger.info("pixel accuracy %s, mean mask IoU %s (%d of %d GT matched) on %d %s images",
                _fmt(result["pixel_accuracy"]), _fmt(result["mean_mask_iou"]), len(matched),
                gt_count, len(images), split)
    return result


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
