"""Evaluation figures: the pictures a reader looks at after an evaluation run.

Every public figure function returns a `matplotlib.figure.Figure` built without pyplot
(no GUI backend, no global state), ready for Kedro's ``matplotlib.MatplotlibDataset``.

Inputs are the canonical tables (`tables.py`), the predictions table (`inference.py`) and
the matched pairs of `evaluation.matched_mask_ious`. That matching is class-agnostic: a
prediction matched to a GT of another class is a classification confusion (the dashboard's
confusion matrix), not a false positive. ``score_threshold`` here must be the one the
matches were computed with (``match_score_threshold`` in the evaluation parameters).
"""
from __future__ import annotations

import logging
import math
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from matplotlib import colormaps, patheffects
from matplotlib.colors import hsv_to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Polygon

from instseg_pipeline.data.images import load_image
from instseg_pipeline.data.masks import decode_strings
from instseg_pipeline.evaluation.matching import mask_iou_matrix

logger = logging.getLogger(__name__)

_AP_KEYS = (("mAP", "AP"), ("mAP_50", "AP50"), ("mAP_75", "AP75"),
            ("mAP_small", "AP\nsmall"), ("mAP_medium", "AP\nmedium"), ("mAP_large", "AP\nlarge"))
_TYPE_LABELS = {"segm": "mask (segm)", "bbox": "box (bbox)"}
_TYPE_COLORS = {"segm": "tab:blue", "bbox": "tab:orange"}
_GT_STYLE = {"color": "white", "style": (0, (3, 2)), "width": 1.3}
_SMALL, _MEDIUM = 32 ** 2, 96 ** 2  # COCO's area range limits
_MAX_CONFUSION_CLASSES = 25


# ==================================================================== tables -> tables

def split_images(images: pd.DataFrame, split: str | None) -> pd.DataFrame:
    """The rows of ``images`` in ``split`` (all rows when ``split`` is None)."""
    return images if split is None else images[images["split"] == split]


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


# ==================================================================== drawing primitives

def _class_colors(category_ids) -> dict[int, tuple]:
    """A distinct RGB colour per category id (tab10 up to 10 ids, spread hues beyond)."""
    ids = sorted({int(c) for c in category_ids})
    if len(ids) <= 10:
        return {c: colormaps["tab10"](i)[:3] for i, c in enumerate(ids)}
    # Golden-ratio hue steps (with alternating brightness) keep neighbouring ids apart.
    return {c: tuple(hsv_to_rgb(((i * 0.618034) % 1.0, 0.8 - 0.25 * (i % 2),
                                 0.95 - 0.3 * (i % 3 == 2)))) for i, c in enumerate(ids)}


def _instance_colors(count: int) -> list[tuple]:
    return [colormaps["tab10"](k % 10)[:3] for k in range(count)]


def _picture(root: str | Path, row) -> np.ndarray:
    """float32 [H, W, 3] in [0, 1] of one ``images`` row."""
    pixels, _ = load_image(Path(root) / str(row.file_name),
                           expected_size=(int(row.width), int(row.height)))
    return pixels.astype(np.float32) / 255.0


def _decode(frame: pd.DataFrame, height: int, width: int) -> np.ndarray:
    """uint8 [N, H, W] masks of a table's ``rle`` column."""
    return decode_strings([str(c) for c in frame["rle"]], int(height), int(width))


def _tint(picture: np.ndarray, masks: np.ndarray, colors, alpha: float = 0.45) -> np.ndarray:
    """float32 [H, W, 3]: ``picture`` with each uint8 [H, W] mask blended in its colour."""
    out = picture.copy()
    for mask, color in zip(masks, colors):
        region = mask.astype(bool)
        out[region] = (1 - alpha) * out[region] + alpha * np.asarray(color, np.float32)
    return out


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


def _outline(ax, mask: np.ndarray, color, style="-", width: float = 1.4) -> None:
    """Draw the outer contours of a uint8 [H, W] mask, edged in black to show on any
    background."""
    contours, _ = cv2.findContours(np.ascontiguousarray(mask, dtype=np.uint8),
                                   cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    edge = [patheffects.withStroke(linewidth=width + 1.2, foreground="black", alpha=0.6)]
    for contour in contours:
        if len(contour) >= 2:
            ax.add_patch(Polygon(contour[:, 0, :], closed=True, fill=False, edgecolor=color,
                                 linestyle=style, linewidth=width, path_effects=edge))


def _caption(ax, point: tuple[float, float], text: str, color, width: int) -> None:
    """Write ``text`` on a coloured tag centred at ``point`` (kept inside an image
    ``width`` pixels wide)."""
    x, y = point
    align = "left" if x < 0.12 * width else "right" if x > 0.88 * width else "center"
    ax.text(x, y, text, fontsize=7, color="white", clip_on=True, ha=align, va="center",
            bbox={"facecolor": color, "alpha": 0.85, "pad": 1.2, "linewidth": 0})


def _caption_points(masks: np.ndarray, captions) -> list[tuple[float, float] | None]:
    """Where to write each mask's caption: its deepest point, pushed down below captions
    already placed. Neighbouring objects collide far less there than at box corners.

    Tag sizes are estimated for a panel about 3.5 inches wide at 7 points.
    """
    height, width = masks.shape[1:]
    line, char = 0.055 * height, 0.016 * width
    placed: list[tuple[float, float, float]] = []
    points = []
    for mask, text in zip(masks, captions):
        point = _deepest_point(mask)
        if point is not None:
            x, y = point
            half = len(text) * char / 2
            while any(abs(x - px) < half + ph and abs(y - py) < line for px, py, ph in placed):
                y += line
            placed.append((x, y, half))
            point = (x, y)
        points.append(point)
    return points


def _deepest_point(mask: np.ndarray) -> tuple[int, int] | None:
    """(x, y) of the distance-transform peak of a uint8 [H, W] mask; None when empty."""
    if not mask.any():
        return None
    # The zero border makes pixels on the image edge count as near the outside too.
    padded = np.pad(np.ascontiguousarray(mask, dtype=np.uint8), 1)
    depth = cv2.distanceTransform(padded, cv2.DIST_L2, 3)
    y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return int(x) - 1, int(y) - 1


def _draw_instances(ax, picture: np.ndarray, masks: np.ndarray, captions, colors) -> None:
    """Tinted masks, their contours and one caption each on ``ax``."""
    ax.imshow(_tint(picture, masks, colors).clip(0, 1))
    for mask, color in zip(masks, colors):
        _outline(ax, mask, color)
    # Captions go on top of every outline, in reverse order so the best-scored (drawn
    # last) claims its place first.
    order = list(range(len(masks)))[::-1]
    points = _caption_points(masks[order], [captions[k] for k in order])
    for k, point in zip(order, points):
        if point is not None:
            _caption(ax, point, captions[k], colors[k], picture.shape[1])
    _clean(ax)


def _draw_outlines(ax, masks: np.ndarray, style: dict) -> None:
    for mask in masks:
        _outline(ax, mask, style["color"], style["style"], style["width"])


def _clean(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def _message(ax, text: str) -> None:
    """A panel with nothing to plot says so instead of staying empty."""
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=10, color="0.35",
            wrap=True, transform=ax.transAxes)
    _clean(ax)


def _notice_figure(title: str, text: str) -> Figure:
    figure = Figure(figsize=(8, 2.4), layout="constrained")
    ax = figure.add_subplot()
    ax.set_title(title, fontsize=12)
    _message(ax, text)
    return figure


def _prediction_captions(frame: pd.DataFrame, names: dict) -> list[str]:
    return [f"{_name(names, c)} {s:.2f}" for c, s in zip(frame["category_id"], frame["score"])]


def _count(number: int, word: str, plural: str | None = None) -> str:
    return f"{number} {word if number == 1 else plural or word + 's'}"


def _name(names: dict, category_id) -> str:
    return names.get(int(category_id), f"class {int(category_id)}")


def _by_score(predictions: pd.DataFrame, score_threshold: float) -> pd.DataFrame:
    """Confident predictions, lowest score first so the best is drawn on top."""
    confident = predictions[predictions["score"] >= score_threshold]
    return confident.sort_values("score", kind="stable")


def _non_crowd(instances: pd.DataFrame) -> pd.DataFrame:
    return instances[~instances["iscrowd"].astype(bool)]


# ==================================================================== 1. visualisation suite

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
        return _notice_figure("Visualisation suite", "no images selected")
    aspect = float(rows["height"].iloc[0]) / float(rows["width"].iloc[0])
    figure = Figure(figsize=(15, 3.7 * aspect * len(rows) + 0.8), layout="constrained")
    axes = figure.subplots(len(rows), 4, squeeze=False)
    context = (instances, predictions, category_names(categories), score_threshold)
    for row_axes, row in zip(axes, rows.itertuples(index=False)):
        _suite_row(row_axes, _picture(root, row), row, context)
    figure.suptitle(f"Ground truth and predictions (score ≥ {score_threshold:g})", fontsize=13)
    return figure


def _rows_for(images: pd.DataFrame, image_ids) -> pd.DataFrame:
    """The ``images`` rows of ``image_ids`` in that order; unknown ids are an error."""
    ids = [int(i) for i in image_ids]
    unknown = sorted(set(ids) - {int(i) for i in images["image_id"]})
    if unknown:
        raise ValueError(f"image ids {unknown} are not in the images table")
    return images.set_index("image_id").loc[ids].reset_index()


def _names_colors(categories: pd.DataFrame) -> tuple[dict, dict]:
    return category_names(categories), _class_colors(categories["category_id"])


def _suite_row(axes, picture: np.ndarray, row, context) -> None:
    instances, predictions, names, threshold = context
    gt = instances[instances["image_id"] == row.image_id]
    pred = _by_score(predictions[predictions["image_id"] == row.image_id], threshold)
    axes[0].imshow(picture)
    axes[0].set_title(f"image {row.image_id} · {Path(str(row.file_name)).name}", fontsize=9)
    _clean(axes[0])
    _draw_ground_truth(axes[1], picture, gt, names)
    axes[1].set_title(f"ground truth: {_count(len(_non_crowd(gt)), 'instance')}", fontsize=9)
    masks = _decode(pred, row.height, row.width)
    _draw_instances(axes[2], picture, masks, _prediction_captions(pred, names),
                    _instance_colors(len(pred)))
    axes[2].set_title(f"prediction: {_count(len(pred), 'instance')}", fontsize=9)
    _draw_semantic(axes[3], picture, masks, pred["category_id"].tolist(), names)


def _draw_ground_truth(ax, picture: np.ndarray, gt: pd.DataFrame, names: dict) -> None:
    """GT instances in instance colours; crowd regions in grey, captioned "(crowd)"."""
    masks = _decode(gt, picture.shape[0], picture.shape[1])
    crowd = gt["iscrowd"].astype(bool).to_numpy()
    colors = [(0.5, 0.5, 0.5) if c else color
              for c, color in zip(crowd, _instance_colors(len(gt)))]
    captions = [f"{_name(names, c)}{' (crowd)' if k else ''}"
                for c, k in zip(gt["category_id"], crowd)]
    _draw_instances(ax, picture, masks, captions, colors)


def _draw_semantic(ax, picture, masks, category_ids: list, names: dict) -> None:
    """Per-class colours (chosen among the classes present, so they stay distinct)."""
    colors = _class_colors(category_ids)
    ax.imshow(_semantic(picture, masks, category_ids, colors).clip(0, 1))
    present = sorted({int(c) for c in category_ids})
    handles = [Patch(color=colors[c], label=_name(names, c)) for c in present]
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7,
                  frameon=False, title="class", title_fontsize=8)
    ax.set_title("prediction by class", fontsize=9)
    _clean(ax)


# ==================================================================== 2. performance dashboard

def performance_dashboard(coco_metrics: dict, pr_arrays: dict | None,
                          matched_mask_ious: pd.DataFrame, history: pd.DataFrame | None,
                          val_history: pd.DataFrame | None, categories: pd.DataFrame,
                          predictions: pd.DataFrame, images: pd.DataFrame,
                          instances: pd.DataFrame, root, iou_type: str = "segm",
                          score_threshold: float = 0.5, split: str | None = "val",
                          grid_images: int = 4) -> Figure:
    """The evaluation at a glance, 7 analysis panels and a prediction grid.

    Row 1: AP breakdown (segm and bbox) | PR curves | matched-IoU histogram | IoU vs size.
    Row 2: per-class AP. Row 3: training loss | detection confusion matrix.
    Row 4: the first ``grid_images`` (at most 4) images of ``split`` with predictions
    (GT dashed).
    coco_metrics: ``{iou_type: {12 stats, per_class_ap}}``; pr_arrays: ``{iou_type:
    {"precision": [T, R, K, A, M], "recall": [T, K, A, M]}}`` (COCO's default thresholds
    unless ``iou_thresholds`` / ``recall_thresholds`` are given there).
    """
    figure = Figure(figsize=(22, 20), layout="constrained")
    grid = figure.add_gridspec(4, 4, height_ratios=[1.0, 0.8, 1.0, 0.85])
    _plot_ap_breakdown(figure.add_subplot(grid[0, 0]), coco_metrics)
    _plot_pr_curves(figure.add_subplot(grid[0, 1]), (pr_arrays or {}).get(iou_type),
                    iou_type, categories)
    _plot_iou_histogram(figure.add_subplot(grid[0, 2]), matched_mask_ious)
    _plot_iou_vs_area(figure.add_subplot(grid[0, 3]), matched_mask_ious)
    _plot_per_class_ap(figure.add_subplot(grid[1, :]), coco_metrics)
    _plot_loss(figure.add_subplot(grid[2, :2]), history, val_history)
    evaluated = split_images(images, split)
    counts = _detection_confusion(categories, predictions, evaluated, instances,
                                  matched_mask_ious, score_threshold)
    _plot_confusion(figure.add_subplot(grid[2, 2:]), counts, score_threshold)
    cells = [figure.add_subplot(grid[3, k]) for k in range(min(grid_images, 4))]
    _prediction_grid(cells, evaluated, instances, predictions, categories, root,
                     score_threshold)
    figure.suptitle(f"Evaluation dashboard ({split or 'all'} split, {len(evaluated)} images)",
                    fontsize=15)
    return figure


def _detection_confusion(categories, predictions, images, instances, matches,
                         score_threshold: float) -> pd.DataFrame:
    """`confusion_counts` of the predictions and GT of ``images``."""
    false_pos = false_positives(_in_images(predictions, images), matches, score_threshold,
                                instances)
    false_neg = false_negatives(instances, matches, images)
    return confusion_counts(categories, matches, false_pos, false_neg)


def _in_images(frame: pd.DataFrame, images: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["image_id"].isin(images["image_id"])]


def _plot_ap_breakdown(ax, coco_metrics: dict) -> None:
    """Grouped bars of AP, AP50, AP75, AP S/M/L per IoU type; -1 (nothing to measure) = n/a."""
    ax.set_title("COCO AP (IoU .50:.95 unless named)", fontsize=11)
    types = [t for t in ("segm", "bbox") if t in (coco_metrics or {})]
    if not types:
        return _message(ax, "no COCO metrics")
    x = np.arange(len(_AP_KEYS))
    width = 0.8 / len(types)
    for j, iou_type in enumerate(types):
        values = [float(coco_metrics[iou_type].get(key, -1)) for key, _ in _AP_KEYS]
        _value_bars(ax, x + (j - (len(types) - 1) / 2) * width, values, width,
                    _TYPE_LABELS[iou_type], _TYPE_COLORS[iou_type])
    ax.set_xticks(x, [label for _, label in _AP_KEYS], fontsize=9)
    ax.set(ylim=(0, 1.1), ylabel="average precision")
    ax.legend(fontsize=8, loc="upper right")


def _value_bars(ax, x, values, width, label, color, annotate: bool = True) -> None:
    """Bars of ``values`` (None / negative drawn as an empty 'n/a' slot)."""
    known = [v is not None and v >= 0 for v in values]
    heights = [v if ok else 0.0 for v, ok in zip(values, known)]
    ax.bar(x, heights, width, label=label, color=color)
    if not annotate:
        return
    for xi, value, ok in zip(x, heights, known):
        ax.text(xi, value + 0.01, f"{value:.2f}" if ok else "n/a", ha="center", va="bottom",
                fontsize=7, rotation=90 if width < 0.3 else 0)


def _plot_per_class_ap(ax, coco_metrics: dict) -> None:
    """Per-category AP@[.5:.95] bars (both IoU types), best first, named by category.

    Categories without ground truth (AP None) are left out and counted in the title.
    """
    rows = {t: coco_metrics[t].get("per_class_ap", [])
            for t in ("segm", "bbox") if t in (coco_metrics or {})}
    tables = {t: _known_ap(r) for t, r in rows.items()}
    absent = max((len(rows[t]) - len(tables[t]) for t in rows), default=0)
    ax.set_title("AP per class" + (f" ({_count(absent, 'class', 'classes')} without ground truth "
                                   "left out)" if absent else ""), fontsize=11)
    tables = {t: frame for t, frame in tables.items() if len(frame)}
    if not tables:
        return _message(ax, "no class with ground truth")
    order = next(iter(tables.values())).sort_values("ap", ascending=False)["name"].tolist()
    x, width = np.arange(len(order)), 0.8 / len(tables)
    for j, (iou_type, frame) in enumerate(tables.items()):
        values = frame.set_index("name")["ap"].reindex(order).fillna(-1.0).tolist()
        _value_bars(ax, x + (j - (len(tables) - 1) / 2) * width, values, width,
                    _TYPE_LABELS[iou_type], _TYPE_COLORS[iou_type], annotate=len(order) <= 30)
    many = len(order) > 12
    ax.set_xticks(x, order, rotation=60 if many else 0, ha="right" if many else "center",
                  fontsize=9 if len(order) <= 30 else 8 if len(order) <= 60 else 6)
    slack = max(0, 12 - len(order)) / 2  # few classes: keep bars narrow and centred
    ax.set(ylim=(0, 1.1), ylabel="AP @ IoU .50:.95",
           xlim=(-0.6 - slack, len(order) - 0.4 + slack))
    ax.legend(fontsize=8, loc="upper right")


def _known_ap(rows: list[dict]) -> pd.DataFrame:
    """category_id, name, ap of the categories whose AP is defined."""
    frame = pd.DataFrame(rows, columns=["category_id", "name", "ap"])
    frame["ap"] = pd.to_numeric(frame["ap"], errors="coerce")
    return frame.dropna(subset=["ap"]).astype({"name": str})


def _plot_pr_curves(ax, arrays: dict | None, iou_type: str, categories: pd.DataFrame) -> None:
    """Class-averaged precision vs recall at IoU .50, .75 and averaged over .50:.95 (area
    all, most detections); classes faint at IoU .50 when there are at most 20."""
    ax.set_title(f"precision–recall, {_TYPE_LABELS.get(iou_type, iou_type)}, "
                 "mean over classes", fontsize=11)
    precision = np.asarray((arrays or {}).get("precision", []), dtype=np.float64)
    if precision.ndim != 5 or precision.size == 0 or (precision <= -1).all():
        return _message(ax, f"no precision/recall arrays for {iou_type}")
    recall = np.asarray(arrays.get("recall_thresholds", np.linspace(0, 1, precision.shape[1])))
    ious = np.asarray(arrays.get("iou_thresholds", np.linspace(0.5, 0.95, precision.shape[0])))
    curves = precision[:, :, :, 0, -1]  # [T, R, K]
    if curves.shape[2] <= 20:
        _faint_class_curves(ax, recall, curves[_iou_index(ious, 0.5)], arrays, categories)
    for label, curve, style in _pr_lines(curves, ious):
        ax.plot(recall, curve, style, linewidth=2, label=f"{label} (AP {np.nanmean(curve):.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision")
    ax.legend(fontsize=8, loc="lower left")


def _pr_lines(curves: np.ndarray, ious: np.ndarray):
    yield "IoU .50", _mean_valid(curves[_iou_index(ious, 0.5)], axis=(1,)), "-"
    yield "IoU .75", _mean_valid(curves[_iou_index(ious, 0.75)], axis=(1,)), "--"
    yield "IoU .50:.95", _mean_valid(curves, axis=(0, 2)), "k-"


def _iou_index(ious: np.ndarray, value: float) -> int:
    return int(np.argmin(np.abs(ious - value)))


def _mean_valid(values: np.ndarray, axis: tuple) -> np.ndarray:
    """Mean over ``axis`` of the entries > -1 (COCO's "no GT" marker); nan where none."""
    valid = values > -1
    total = np.where(valid, values, 0.0).sum(axis=axis)
    count = valid.sum(axis=axis)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _faint_class_curves(ax, recall, curves: np.ndarray, arrays: dict,
                        categories: pd.DataFrame) -> None:
    """One thin line per category at one IoU; curves: [R, K]."""
    names, colors = _names_colors(categories)
    ids = arrays.get("category_ids") or sorted(names)
    for k, category_id in enumerate(ids[:curves.shape[1]]):
        if (curves[:, k] > -1).any():
            ax.plot(recall, curves[:, k], color=colors.get(int(category_id), "0.6"),
                    linewidth=0.8, alpha=0.45)


def _plot_iou_histogram(ax, matches: pd.DataFrame) -> None:
    """Stacked histogram of matched-pair mask IoU (same class vs another class)."""
    ax.set_title("mask IoU of matched (prediction, GT) pairs", fontsize=11)
    if len(matches) == 0:
        return _message(ax, "no matched prediction / GT pairs")
    ious = matches["iou"].to_numpy(dtype=np.float64)
    same = (matches["pred_category_id"] == matches["gt_category_id"]).to_numpy()
    low = min(0.5, math.floor(ious.min() * 20) / 20)
    groups = [(ious[same], "same class", "tab:green"), (ious[~same], "other class", "tab:red")]
    groups = [g for g in groups if len(g[0])]
    ax.hist([g[0] for g in groups], bins=np.linspace(low, 1.0, 21), stacked=True,
            label=[g[1] for g in groups], color=[g[2] for g in groups])
    ax.axvline(ious.mean(), color="k", linestyle="--",
               label=f"mean {ious.mean():.3f}, median {np.median(ious):.3f} (n={len(ious)})")
    ax.set(xlabel="mask IoU of matched pair", ylabel="pairs")
    ax.legend(fontsize=8, loc="upper left")


def _plot_iou_vs_area(ax, matches: pd.DataFrame) -> None:
    """Mask IoU against GT area (log x), with the mean per log-spaced area bin."""
    ax.set_title("mask quality vs object size", fontsize=11, pad=16)
    if len(matches) == 0:
        return _message(ax, "no matched pairs to relate to object size")
    area = matches["gt_area"].to_numpy(dtype=np.float64).clip(min=1)
    ious = matches["iou"].to_numpy(dtype=np.float64)
    ax.scatter(area, ious, s=12, alpha=0.35, color="tab:blue", label="matched pair")
    centres, means = _binned_mean(area, ious, bins=8)
    ax.plot(centres, means, "o-", color="tab:red", linewidth=2, label="mean per size bin")
    ax.set_xscale("log")
    low, high = min(area.min(), _SMALL) / 1.5, max(area.max(), _MEDIUM) * 1.5
    _size_ranges(ax, low, high)
    ax.set(xlim=(low, high), ylim=(0, 1.02), xlabel="GT mask area (pixels, log scale)",
           ylabel="mask IoU")
    ax.legend(fontsize=8, loc="lower right")


def _size_ranges(ax, low: float, high: float) -> None:
    """Shade COCO's small / medium / large area ranges and name them above the axes."""
    spans = (("small", low, _SMALL), ("medium", _SMALL, _MEDIUM), ("large", _MEDIUM, high))
    for k, (name, start, stop) in enumerate(spans):
        ax.axvspan(start, stop, color="0.92" if k % 2 else "0.97", zorder=0)
        ax.text(math.sqrt(start * stop), 1.01, name, ha="center", va="bottom", fontsize=8,
                color="0.3", transform=ax.get_xaxis_transform())


def _binned_mean(x: np.ndarray, y: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Geometric bin centres and mean ``y`` of the non-empty log-spaced bins of ``x``."""
    low, high = x.min(), max(x.max(), x.min() * 2)
    edges = np.geomspace(low, high, bins + 1)
    index = np.clip(np.digitize(x, edges) - 1, 0, bins - 1)
    filled = np.unique(index)
    means = np.array([y[index == b].mean() for b in filled])
    return np.sqrt(edges[filled] * edges[filled + 1]), means


def _plot_loss(ax, history: pd.DataFrame | None, val_history: pd.DataFrame | None) -> None:
    """Training loss per iteration (raw, faint; moving average) and validation loss markers."""
    ax.set_title("training curves", fontsize=11)
    if history is None or len(history) == 0:
        return _message(ax, "no training history")
    column = "loss" if "loss" in history else next(
        (c for c in history.columns if c.startswith("loss")), None)
    if column is None:
        return _message(ax, "training history has no loss column")
    window = max(1, len(history) // 50)
    ax.plot(history["iteration"], history[column], color="tab:blue", alpha=0.25,
            linewidth=0.8, label="training loss (per iteration)")
    ax.plot(history["iteration"], history[column].rolling(window, min_periods=1).mean(),
            color="tab:blue", linewidth=2, label=f"training loss (moving average, {window})")
    if val_history is not None and len(val_history) and "loss" in val_history:
        ax.plot(val_history["iteration"], val_history["loss"], "o--", color="black",
                label="validation loss")
    if (history[column] > 0).all():
        ax.set_yscale("log")
    ax.set(xlabel="iteration", ylabel="loss")
    ax.legend(fontsize=8, loc="upper right")


def _plot_confusion(ax, counts: pd.DataFrame, score_threshold: float) -> None:
    """Annotated count matrix, coloured by the share of its GT row."""
    ax.set_title(f"detections at score ≥ {score_threshold:g}: GT class vs predicted class "
                 "(background = false positive, missed = false negative)", fontsize=10)
    if counts.to_numpy().sum() == 0:
        return _message(ax, "no detections and no ground truth to compare")
    values = counts.to_numpy()
    shares = values / np.maximum(values.sum(axis=1, keepdims=True), 1)
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    size = 12 if values.shape[0] <= 6 else 9 if values.shape[0] <= 12 else 7
    for (i, j), value in np.ndenumerate(values):
        if value:
            ax.text(j, i, str(value), ha="center", va="center", fontsize=size,
                    color="white" if shares[i, j] > 0.5 else "black")
    ax.set_xticks(range(values.shape[1]), counts.columns, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(values.shape[0]), counts.index, fontsize=8)
    ax.set(xlabel="predicted class", ylabel="ground-truth class")


def _prediction_grid(axes, images: pd.DataFrame, instances: pd.DataFrame,
                     predictions: pd.DataFrame, categories: pd.DataFrame, root,
                     score_threshold: float) -> None:
    """The first images (by id) of ``images``, predictions tinted, GT dashed."""
    rows = images.sort_values("image_id").head(len(axes))
    names = category_names(categories)
    for ax, row in zip(axes, rows.itertuples(index=False)):
        _draw_comparison(ax, _picture(root, row), row, instances, predictions,
                         names, score_threshold)
        ax.set_title(f"image {row.image_id}: {ax.get_title()}", fontsize=9)
    for ax in axes[len(rows):]:
        ax.set_axis_off()


def _draw_comparison(ax, picture: np.ndarray, row, instances: pd.DataFrame,
                     predictions: pd.DataFrame, names: dict, score_threshold: float) -> None:
    """Confident predictions tinted and captioned; non-crowd GT outlined dashed white."""
    gt = _non_crowd(instances[instances["image_id"] == row.image_id])
    pred = _by_score(predictions[predictions["image_id"] == row.image_id], score_threshold)
    _draw_instances(ax, picture, _decode(pred, row.height, row.width),
                    _prediction_captions(pred, names), _instance_colors(len(pred)))
    _draw_outlines(ax, _decode(gt, row.height, row.width), _GT_STYLE)
    ax.set_title(f"{len(pred)} predicted, {len(gt)} GT (dashed)", fontsize=9)


# ==================================================================== 3. error analysis

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
        return _notice_figure("Worst and best images", "no image has ground truth or "
                              f"predictions with score ≥ {score_threshold:g}")
    ranked = scores.assign(key=scores["mean_iou"].fillna(-1.0)).sort_values(
        ["f1", "key", "image_id"])
    # With fewer than 2n images, the worst half is "worst" and the rest "best".
    worst = ranked.head(min(n, math.ceil(len(ranked) / 2)))
    best = ranked[~ranked["image_id"].isin(worst["image_id"])].tail(n).iloc[::-1]
    sections = [(f"worst {_count(len(worst), 'image')}", worst),
                (f"best {_count(len(best), 'image')}", best)]
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
            _draw_comparison(ax, _picture(root, row), row, instances, predictions, names,
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


def false_positive_gallery(images: pd.DataFrame, instances: pd.DataFrame,
                           categories: pd.DataFrame, predictions: pd.DataFrame,
                           matched_mask_ious: pd.DataFrame, root,
                           score_threshold: float = 0.5, n: int = 12,
                           split: str | None = "val") -> Figure:
    """Crops of the ``n`` highest-score predictions matched to no GT (see `false_positives`),
    mask tinted, GT of the image dashed, titled with class, score and best IoU with any GT
    (high: a duplicate or poor localisation; ~0: a hallucination)."""
    evaluated = split_images(images, split)
    found = false_positives(_in_images(predictions, evaluated), matched_mask_ious,
                            score_threshold, instances)
    logger.info("%d false positives at score >= %g", len(found), score_threshold)
    if len(found) == 0:
        any_confident = bool((predictions["score"] >= score_threshold).any())
        return _notice_figure("False positives", "none found: " + (
            f"every prediction with score ≥ {score_threshold:g} was matched to a ground-truth "
            "instance" if any_confident else f"no prediction has score ≥ {score_threshold:g}"))
    title = (f"False positives: {_count(len(found), 'prediction')} with score "
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
        return _notice_figure("False negatives", "none found: every non-crowd ground-truth "
                              "instance was matched to a prediction")
    title = (f"False negatives: {_count(len(found), 'non-crowd GT instance')} matched to no prediction "
             f"(largest {min(n, len(found))}; predictions with score ≥ {score_threshold:g} "
             "dashed)")
    return _gallery(found.head(n), title, evaluated, categories, root,
                    _fn_context(predictions, score_threshold))


def _fp_context(instances: pd.DataFrame):
    """For an FP: the image's non-crowd GT as context and the title."""
    def context(item, names: dict, row):
        others = _non_crowd(instances[instances["image_id"] == row.image_id])
        iou, _ = _best_overlap(item, others, row)
        overlap = ("no GT in image" if iou is None else "overlaps no GT" if iou == 0
                   else f"best GT IoU {_iou(iou)}")
        return others, (f"{_name(names, item.category_id)} · score {item.score:.2f}\n"
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
        return shown, (f"{_name(names, item.category_id)} · area {int(item.area)}\n"
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
    names, colors = _names_colors(categories)
    image_rows = images.set_index("image_id")
    pictures: dict[int, np.ndarray] = {}
    for ax, item in zip(axes, items.itertuples(index=False)):
        row = image_rows.loc[[item.image_id]].reset_index().iloc[0]
        if item.image_id not in pictures:
            pictures[item.image_id] = _picture(root, row)
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
    focus = _decode(pd.DataFrame({"rle": [item.rle]}), height, width)[:, y0:y1, x0:x1]
    context = _decode(others, height, width)[:, y0:y1, x0:x1]
    ax.imshow(_tint(picture[y0:y1, x0:x1], focus, [color], alpha=0.5).clip(0, 1))
    _draw_outlines(ax, context, _GT_STYLE)
    _outline(ax, focus[0], color, width=1.8)
    _clean(ax)


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
