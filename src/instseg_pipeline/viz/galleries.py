"""Error-analysis figures: the worst and best images by per-image F1, and galleries of
false-positive predictions and missed (false-negative) ground truth.

The error tables they show come from `evaluation.errors`; ``score_threshold`` must be the
one the matches were computed with (``match_score_threshold`` in the evaluation parameters).
"""
from __future__ import annotations

import logging
import math
import textwrap

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from instseg_pipeline.evaluation.errors import (
    category_names,
    false_negatives,
    false_positives,
    image_scores,
    in_images,
    non_crowd,
    split_images,
)
from instseg_pipeline.evaluation.matching import mask_iou_matrix
from instseg_pipeline.viz.draw import (
    GT_STYLE,
    class_name,
    clean,
    count_of,
    decode_masks,
    draw_comparison,
    draw_outlines,
    load_picture,
    names_colors,
    notice_figure,
    outline,
    tint,
)

logger = logging.getLogger(__name__)


# ==================================================================== ranked images

def worst_and_best_images(images: pd.DataFrame, instances: pd.DataFrame,
                          categories: pd.DataFrame, predictions: pd.DataFrame,
                          matched_mask_ious: pd.DataFrame, root, n: int = 4,
                          score_threshold: float = 0.5, split: str | None = "val") -> Figure:
    """The ``n`` worst and ``n`` best images of ``split`` by per-image F1 (correct-class
    matches at the matching IoU; ties broken by mean matched IoU), predictions tinted and GT
    dashed, each titled with its F1, mean IoU, found GT and false positives."""
    evaluated = split_images(images, split)
    scores = image_scores(evaluated, instances, predictions, matched_mask_ious,
                          score_threshold).dropna(subset=["f1"])
    if len(scores) == 0:
        return notice_figure("Worst and best images", "no image has ground truth or "
                             f"predictions with score ≥ {score_threshold:g}")
    ranked = scores.assign(key=scores["mean_iou"].fillna(-1.0)).sort_values(
        ["f1", "key", "image_id"])
    # With fewer than 2n images, the worst half is "worst" and the rest "best".
    worst = ranked.head(min(n, math.ceil(len(ranked) / 2)))
    best = ranked[~ranked["image_id"].isin(worst["image_id"])].tail(n).iloc[::-1]
    sections = [(f"worst {count_of(len(worst), 'image')}", worst),
                (f"best {count_of(len(best), 'image')}", best)]
    sections = [s for s in sections if len(s[1])]
    return _ranked_figure(sections, evaluated, instances, predictions, categories, root,
                          score_threshold)


def _ranked_figure(sections, images, instances, predictions, categories, root,
                   score_threshold: float) -> Figure:
    columns = max(len(frame) for _, frame in sections)
    aspect = float((images["height"] / images["width"]).median())
    figure = Figure(figsize=(max(4.2 * columns, 9), (4.2 * aspect + 1.0) * len(sections)),
                    layout="constrained")
    names = category_names(categories)
    rows_by_id = images.set_index("image_id")
    for sub, (title, frame) in zip(np.atleast_1d(figure.subfigures(len(sections), 1)),
                                   sections):
        axes = np.atleast_1d(sub.subplots(1, columns))
        for ax, score in zip(axes, frame.itertuples(index=False)):
            row = rows_by_id.loc[[score.image_id]].reset_index().iloc[0]
            draw_comparison(ax, load_picture(root, row), row, instances, predictions, names,
                            score_threshold)
            ax.set_title(_score_title(score), fontsize=9)
        for ax in axes[len(frame):]:
            ax.remove()
        sub.suptitle(f"{title} (F1 of correct-class matches, score ≥ {score_threshold:g}; "
                     "GT dashed)", fontsize=12)
    return figure


def _score_title(score) -> str:
    iou = "–" if pd.isna(score.mean_iou) else f"{score.mean_iou:.2f}"
    wrong = score.matched - score.correct
    return (f"image {score.image_id} · F1 {score.f1:.2f} · mean IoU {iou}\n"
            f"{score.correct}/{score.ground_truth} GT found, "
            f"{score.predicted - score.matched} FP, {wrong} wrong class")


# ==================================================================== false positives / negatives

def false_positive_gallery(images: pd.DataFrame, instances: pd.DataFrame,
                           categories: pd.DataFrame, predictions: pd.DataFrame,
                           matched_mask_ious: pd.DataFrame, root,
                           score_threshold: float = 0.5, n: int = 12,
                           split: str | None = "val") -> Figure:
    """Crops of the ``n`` highest-score predictions matched to no GT (see `false_positives`),
    mask tinted, GT of the image dashed, titled with class, score and best IoU with any GT
    (high: a duplicate or poor localisation; ~0: a hallucination)."""
    evaluated = split_images(images, split)
    found = false_positives(in_images(predictions, evaluated), matched_mask_ious,
                            score_threshold, instances)
    logger.info("%d false positives at score >= %g", len(found), score_threshold)
    if len(found) == 0:
        any_confident = bool((predictions["score"] >= score_threshold).any())
        return notice_figure("False positives", "none found: " + (
            f"every prediction with score ≥ {score_threshold:g} was matched to a ground-truth "
            "instance" if any_confident else f"no prediction has score ≥ {score_threshold:g}"))
    title = (f"False positives: {count_of(len(found), 'prediction')} with score "
             f"≥ {score_threshold:g} matched to no GT (top {min(n, len(found))} by score; "
             "GT dashed)")
    return _gallery(found.head(n), title, evaluated, categories, root,
                    _fp_context(instances))


def false_negative_gallery(images: pd.DataFrame, instances: pd.DataFrame,
                           categories: pd.DataFrame, predictions: pd.DataFrame,
                           matched_mask_ious: pd.DataFrame, root,
                           score_threshold: float = 0.5, n: int = 12,
                           split: str | None = "val") -> Figure:
    """Crops of the ``n`` largest non-crowd GT instances matched to no prediction (see
    `false_negatives`), mask tinted, confident predictions dashed, titled with class, area
    and the best IoU with any prediction of any score (and that prediction's score)."""
    evaluated = split_images(images, split)
    found = false_negatives(instances, matched_mask_ious, evaluated)
    logger.info("%d false negatives among the %s images", len(found), split or "all")
    if len(found) == 0:
        return notice_figure("False negatives", "none found: every non-crowd ground-truth "
                             "instance was matched to a prediction")
    title = (f"False negatives: {count_of(len(found), 'non-crowd GT instance')} matched to "
             f"no prediction (largest {min(n, len(found))}; predictions with score "
             f"≥ {score_threshold:g} dashed)")
    return _gallery(found.head(n), title, evaluated, categories, root,
                    _fn_context(predictions, score_threshold))


def _fp_context(instances: pd.DataFrame):
    """For an FP: the image's non-crowd GT as context and the title."""
    def context(item, names: dict, row):
        others = non_crowd(instances[instances["image_id"] == row.image_id])
        iou, _ = _best_overlap(item, others, row)
        overlap = ("no GT in image" if iou is None else "overlaps no GT" if iou == 0
                   else f"best GT IoU {_iou(iou)}")
        return others, (f"{class_name(names, item.category_id)} · score {item.score:.2f}\n"
                        f"image {row.image_id} · {overlap}")
    return context


def _fn_context(predictions: pd.DataFrame, score_threshold: float):
    """For an FN: the image's confident predictions as context and the title."""
    def context(item, names: dict, row):
        candidates = predictions[predictions["image_id"] == row.image_id]
        iou, best = _best_overlap(item, candidates, row)
        overlap = ("no prediction in image" if iou is None
                   else "overlaps no prediction" if iou == 0
                   else f"best pred IoU {_iou(iou)} (score {best.score:.2f})")
        shown = candidates[candidates["score"] >= score_threshold]
        return shown, (f"{class_name(names, item.category_id)} · area {int(item.area)}\n"
                       f"image {row.image_id} · {overlap}")
    return context


def _iou(value: float) -> str:
    return f"{value:.2f}" if value >= 0.005 else "< 0.01"


def _best_overlap(item, others: pd.DataFrame, row):
    """(highest mask IoU of ``item`` with a row of ``others``, that row); (None, None) if
    empty. ``row``: the ``images`` row (masks share its size)."""
    if len(others) == 0:
        return None, None
    size = [int(row.height), int(row.width)]
    ious = mask_iou_matrix([{"size": size, "counts": str(item.rle)}],
                           [{"size": size, "counts": str(c)} for c in others["rle"]])[0]
    best = int(np.argmax(ious))
    return float(ious[best]), others.iloc[best]


def _gallery(items: pd.DataFrame, title: str, images: pd.DataFrame,
             categories: pd.DataFrame, root, context) -> Figure:
    """A grid of crops, one per row of ``items`` (prediction or instance rows)."""
    columns = min(4, len(items))
    rows = math.ceil(len(items) / columns)
    width = max(3.6 * columns, 8.0)  # room for the title when there are few crops
    figure = Figure(figsize=(width, 3.7 * rows + 0.8), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    names, colors = names_colors(categories)
    image_rows = images.set_index("image_id")
    pictures: dict[int, np.ndarray] = {}
    for ax, item in zip(axes, items.itertuples(index=False)):
        row = image_rows.loc[[item.image_id]].reset_index().iloc[0]
        if item.image_id not in pictures:
            pictures[item.image_id] = load_picture(root, row)
        others, text = context(item, names, row)
        _draw_crop(ax, pictures[item.image_id], item, others,
                   colors.get(int(item.category_id), (1.0, 0.0, 0.0)))
        ax.set_title(text, fontsize=9)
    for ax in axes[len(items):]:
        ax.remove()
    figure.suptitle(textwrap.fill(title, width=int(width * 10)), fontsize=12)
    return figure


def _draw_crop(ax, picture: np.ndarray, item, others: pd.DataFrame, color) -> None:
    """The item's box with context padding: its mask tinted, ``others`` dashed white."""
    height, width = picture.shape[:2]
    x0, y0, x1, y1 = _crop_box(item.bbox, height, width)
    focus = decode_masks(pd.DataFrame({"rle": [item.rle]}), height, width)[:, y0:y1, x0:x1]
    context = decode_masks(others, height, width)[:, y0:y1, x0:x1]
    ax.imshow(tint(picture[y0:y1, x0:x1], focus, [color], alpha=0.5).clip(0, 1))
    draw_outlines(ax, context, GT_STYLE)
    outline(ax, focus[0], color, width=1.8)
    clean(ax)


def _crop_box(bbox, height: int, width: int, pad: float = 0.35,
              min_side: int = 64) -> tuple[int, int, int, int]:
    """Integer (x0, y0, x1, y1) of a COCO box grown by ``pad`` of its size each side, at
    least ``min_side`` pixels a side (small objects need context to be judged), clipped to
    the image."""
    x, y, w, h = (float(v) for v in bbox)
    x0, x1 = _padded_span(x, w, pad, min_side, width)
    y0, y1 = _padded_span(y, h, pad, min_side, height)
    return x0, y0, x1, y1


def _padded_span(start: float, length: float, pad: float, min_side: int,
                 limit: int) -> tuple[int, int]:
    """[low, high) around [start, start + length), grown and clipped to [0, limit)."""
    side = min(limit, max(min_side, length * (1 + 2 * pad)))
    low = start + length / 2 - side / 2
    low = int(min(max(0.0, low), limit - side))
    return low, max(low + 1, min(limit, math.ceil(low + side)))
