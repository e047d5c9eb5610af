"""The visualisation suite: chosen images side by side as original | ground truth |
predicted instances | predicted classes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from instseg_pipeline.evaluation.errors import category_names, non_crowd
from instseg_pipeline.viz.draw import (
    by_score,
    class_colors,
    class_name,
    clean,
    count_of,
    decode_masks,
    draw_instances,
    instance_colors,
    load_picture,
    notice_figure,
    prediction_captions,
)


def visualisation_suite(images: pd.DataFrame, instances: pd.DataFrame,
                        categories: pd.DataFrame, predictions: pd.DataFrame, root,
                        image_ids, score_threshold: float = 0.5) -> Figure:
    """One row per image: original | ground truth | predicted instances | predicted classes.

    Instances are tinted and outlined, one colour each, captioned "name" (GT) or "name
    score" (predictions with ``score >= score_threshold``); the last column merges the
    predictions into a per-class map (highest score wins overlaps) with a class legend.
    """
    rows = _rows_for(images, image_ids)
    if len(rows) == 0:
        return notice_figure("Visualisation suite", "no images selected")
    aspect = float(rows["height"].iloc[0]) / float(rows["width"].iloc[0])
    figure = Figure(figsize=(15, 3.7 * aspect * len(rows) + 0.8), layout="constrained")
    axes = figure.subplots(len(rows), 4, squeeze=False)
    context = (instances, predictions, category_names(categories), score_threshold)
    for row_axes, row in zip(axes, rows.itertuples(index=False)):
        _suite_row(row_axes, load_picture(root, row), row, context)
    figure.suptitle(f"Ground truth and predictions (score ≥ {score_threshold:g})", fontsize=13)
    return figure


def _rows_for(images: pd.DataFrame, image_ids) -> pd.DataFrame:
    """The ``images`` rows of ``image_ids`` in that order; unknown ids are an error."""
    ids = [int(i) for i in image_ids]
    unknown = sorted(set(ids) - {int(i) for i in images["image_id"]})
    if unknown:
        raise ValueError(f"image ids {unknown} are not in the images table")
    return images.set_index("image_id").loc[ids].reset_index()


def _suite_row(axes, picture: np.ndarray, row, context) -> None:
    instances, predictions, names, threshold = context
    gt = instances[instances["image_id"] == row.image_id]
    pred = by_score(predictions[predictions["image_id"] == row.image_id], threshold)
    axes[0].imshow(picture)
    axes[0].set_title(f"image {row.image_id} · {Path(str(row.file_name)).name}", fontsize=9)
    clean(axes[0])
    _draw_ground_truth(axes[1], picture, gt, names)
    axes[1].set_title(f"ground truth: {count_of(len(non_crowd(gt)), 'instance')}", fontsize=9)
    masks = decode_masks(pred, row.height, row.width)
    draw_instances(axes[2], picture, masks, prediction_captions(pred, names),
                   instance_colors(len(pred)))
    axes[2].set_title(f"prediction: {count_of(len(pred), 'instance')}", fontsize=9)
    _draw_semantic(axes[3], picture, masks, pred["category_id"].tolist(), names)


def _draw_ground_truth(ax, picture: np.ndarray, gt: pd.DataFrame, names: dict) -> None:
    """GT instances in instance colours; crowd regions in grey, captioned "(crowd)"."""
    masks = decode_masks(gt, picture.shape[0], picture.shape[1])
    crowd = gt["iscrowd"].astype(bool).to_numpy()
    colors = [(0.5, 0.5, 0.5) if c else color
              for c, color in zip(crowd, instance_colors(len(gt)))]
    captions = [f"{class_name(names, c)}{' (crowd)' if k else ''}"
                for c, k in zip(gt["category_id"], crowd)]
    draw_instances(ax, picture, masks, captions, colors)


def _draw_semantic(ax, picture, masks, category_ids: list, names: dict) -> None:
    """Per-class colours (chosen among the classes present, so they stay distinct)."""
    colors = class_colors(category_ids)
    ax.imshow(_semantic(picture, masks, category_ids, colors).clip(0, 1))
    present = sorted({int(c) for c in category_ids})
    handles = [Patch(color=colors[c], label=class_name(names, c)) for c in present]
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7,
                  frameon=False, title="class", title_fontsize=8)
    ax.set_title("prediction by class", fontsize=9)
    clean(ax)


def _semantic(picture: np.ndarray, masks: np.ndarray, category_ids, colors: dict) -> np.ndarray:
    """float32 [H, W, 3]: class colour per pixel over a dimmed grey image.

    Masks are painted in order, so the last (highest score, when sorted) wins overlaps.
    """
    grey = picture.mean(axis=2, keepdims=True).repeat(3, axis=2) * 0.7
    out = grey.copy()
    for mask, category_id in zip(masks, category_ids):
        region = mask.astype(bool)
        out[region] = 0.35 * grey[region] + 0.65 * np.asarray(colors[int(category_id)])
    return out
