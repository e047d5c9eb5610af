"""Error analysis: which predictions are false positives, which GT instances were missed,
how well each image went and which classes get confused (pandas / numpy, no figures).

Inputs are the canonical tables (`data.tables`), the predictions table (`predict.batch`)
and the matched pairs of `evaluation.metrics.matched_mask_ious`. That matching is
class-agnostic: a prediction matched to a GT of another class is a classification
confusion (`confusion_counts`), not a false positive. ``score_threshold`` here must be the
one the matches were computed with (``match_score_threshold`` in the evaluation parameters).
The figures drawn from these tables are in `viz.dashboard` and `viz.galleries`.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from instseg_pipeline.evaluation.matching import mask_iou_matrix

_MAX_CONFUSION_CLASSES = 25


def split_images(images: pd.DataFrame, split: str | None) -> pd.DataFrame:
    """The rows of ``images`` in ``split`` (all rows when ``split`` is None)."""
    return images if split is None else images[images["split"] == split]


def in_images(frame: pd.DataFrame, images: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``frame`` (predictions or instances) whose image is in ``images``."""
    return frame[frame["image_id"].isin(images["image_id"])]


def non_crowd(instances: pd.DataFrame) -> pd.DataFrame:
    """The instances that are not crowd regions (the ones evaluation counts)."""
    return instances[~instances["iscrowd"].astype(bool)]


def false_positives(predictions: pd.DataFrame, matches: pd.DataFrame,
                    score_threshold: float = 0.5,
                    instances: pd.DataFrame | None = None) -> pd.DataFrame:
    """Predictions with ``score >= score_threshold`` matched to no GT, highest score first.

    With ``instances``, predictions lying in a crowd region are left out, as COCO ignores
    them (`in_crowd`).
    """
    confident = predictions[predictions["score"] >= score_threshold]
    unmatched = confident[~confident["prediction_id"].isin(matches["prediction_id"])]
    if instances is not None:
        unmatched = unmatched[~in_crowd(unmatched, instances)]
    return unmatched.sort_values(["score", "prediction_id"], ascending=[False, True])


def in_crowd(predictions: pd.DataFrame, instances: pd.DataFrame,
             threshold: float = 0.5) -> np.ndarray:
    """bool [len(predictions)]: the prediction lies in a crowd region of its image.

    "Lies in" is COCO's crowd rule: intersection / prediction area >= ``threshold``.
    """
    flags = np.zeros(len(predictions), dtype=bool)
    image_ids = predictions["image_id"].to_numpy()
    crowds = instances[instances["iscrowd"].astype(bool)]
    for image_id, crowd in crowds.groupby("image_id"):
        here = np.flatnonzero(image_ids == image_id)
        if len(here) == 0:
            continue
        rows = predictions.iloc[here]
        size = [int(rows["height"].iloc[0]), int(rows["width"].iloc[0])]
        ious = mask_iou_matrix([{"size": size, "counts": str(c)} for c in rows["rle"]],
                               [{"size": size, "counts": str(c)} for c in crowd["rle"]],
                               gt_crowd=np.ones(len(crowd), dtype=bool))
        flags[here] = ious.max(axis=1) >= threshold
    return flags


def false_negatives(instances: pd.DataFrame, matches: pd.DataFrame,
                    split_images: pd.DataFrame) -> pd.DataFrame:
    """Non-crowd GT instances of ``split_images`` matched to no prediction, largest first."""
    evaluated = instances[instances["image_id"].isin(split_images["image_id"])
                          & ~instances["iscrowd"].astype(bool)]
    missed = evaluated[~evaluated["instance_id"].isin(matches["instance_id"])]
    return missed.sort_values(["area", "instance_id"], ascending=[False, True])


def image_scores(images: pd.DataFrame, instances: pd.DataFrame, predictions: pd.DataFrame,
                 matches: pd.DataFrame, score_threshold: float = 0.5) -> pd.DataFrame:
    """One row per image of ``images``: how well its instances were found.

    Columns: image_id, ground_truth (non-crowd GT), predicted (score >= threshold, outside
    crowd regions), matched, correct (matched with the right class), recall, precision,
    f1 (of the correct matches, i.e. F1 at the matching IoU; nan when the image has neither
    GT nor predictions), mean_iou (of the matched pairs; nan when none).
    """
    frame = images[["image_id"]].set_index("image_id")
    frame["ground_truth"] = _count_by_image(instances[~instances["iscrowd"].astype(bool)])
    confident = predictions[predictions["score"] >= score_threshold]
    frame["predicted"] = _count_by_image(confident[~in_crowd(confident, instances)])
    correct = matches["pred_category_id"] == matches["gt_category_id"]
    grouped = matches.assign(correct=correct).groupby("image_id")
    frame["matched"] = grouped.size()
    frame["correct"] = grouped["correct"].sum()
    frame = frame.fillna(0).astype("int64")
    frame["mean_iou"] = grouped["iou"].mean()
    return _with_rates(frame).reset_index()


def _count_by_image(frame: pd.DataFrame) -> pd.Series:
    return frame.groupby("image_id").size()


def _with_rates(frame: pd.DataFrame) -> pd.DataFrame:
    """Add recall, precision and F1 (nan where the denominator is 0)."""
    correct = frame["correct"].astype(float)
    frame["recall"] = correct / frame["ground_truth"].where(frame["ground_truth"] > 0)
    frame["precision"] = correct / frame["predicted"].where(frame["predicted"] > 0)
    total = (frame["ground_truth"] + frame["predicted"]).astype(float)
    frame["f1"] = 2 * correct / total.where(total > 0)
    return frame


def detection_confusion(categories: pd.DataFrame, predictions: pd.DataFrame,
                        images: pd.DataFrame, instances: pd.DataFrame, matches: pd.DataFrame,
                        score_threshold: float) -> pd.DataFrame:
    """`confusion_counts` of the predictions and GT of ``images``."""
    false_pos = false_positives(in_images(predictions, images), matches, score_threshold,
                                instances)
    false_neg = false_negatives(instances, matches, images)
    return confusion_counts(categories, matches, false_pos, false_neg)


def confusion_counts(categories: pd.DataFrame, matches: pd.DataFrame,
                     false_pos: pd.DataFrame, false_neg: pd.DataFrame) -> pd.DataFrame:
    """int64 counts, rows = GT class + "background", columns = predicted class + "missed".

    Matched pairs fill the class block, unmatched predictions the "background" row and
    unmatched GT the "missed" column. Only classes that occur are kept (at most the 25 most
    frequent), ordered by category id; labels are category names.
    """
    pairs = pd.concat([
        pd.DataFrame({"gt": matches["gt_category_id"], "pred": matches["pred_category_id"]}),
        pd.DataFrame({"gt": -1, "pred": false_pos["category_id"]}),
        pd.DataFrame({"gt": false_neg["category_id"], "pred": -1}),
    ], ignore_index=True).astype("int64")
    classes = _frequent_classes(pairs)
    names = category_names(categories)
    pairs = pairs[pairs["gt"].isin(classes + [-1]) & pairs["pred"].isin(classes + [-1])]
    counts = pd.crosstab(pairs["gt"], pairs["pred"]).reindex(
        index=classes + [-1], columns=classes + [-1], fill_value=0)
    counts.index = [names.get(c, "background") if c >= 0 else "background" for c in counts.index]
    counts.columns = [names.get(c, "missed") if c >= 0 else "missed" for c in counts.columns]
    return counts.astype("int64")


def _frequent_classes(pairs: pd.DataFrame) -> list[int]:
    seen = pd.concat([pairs["gt"], pairs["pred"]])
    frequency = seen[seen >= 0].value_counts()
    return sorted(int(c) for c in frequency.index[:_MAX_CONFUSION_CLASSES])


def category_names(categories: pd.DataFrame) -> dict[int, str]:
    """category_id -> name."""
    return {int(c): str(n) for c, n in zip(categories["category_id"], categories["name"])}
