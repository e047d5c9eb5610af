"""The performance dashboard: one figure with the evaluation at a glance (AP breakdown,
per-class AP, panoptic quality, PR curves, matched-IoU and size analysis, training loss, detection
confusions and a grid of predictions).

Built without pyplot (no GUI backend, no global state), ready for Kedro's
``matplotlib.MatplotlibDataset``. The error tables behind the confusion matrix are
`evaluation.errors`; ``score_threshold`` must be the one the matches were computed with.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from instseg_pipeline.evaluation.errors import category_names, detection_confusion, split_images
from instseg_pipeline.viz.draw import (
    count_of,
    draw_comparison,
    load_picture,
    message,
    names_colors,
)

_AP_KEYS = (("mAP", "AP"), ("mAP_50", "AP50"), ("mAP_75", "AP75"),
            ("mAP_small", "AP\nsmall"), ("mAP_medium", "AP\nmedium"), ("mAP_large", "AP\nlarge"))
_TYPE_LABELS = {"segm": "mask (segm)", "bbox": "box (bbox)"}
_TYPE_COLORS = {"segm": "tab:blue", "bbox": "tab:orange"}
_SMALL, _MEDIUM = 32 ** 2, 96 ** 2  # COCO's area range limits


def performance_dashboard(coco_metrics: dict, pr_arrays: dict | None,
                          matched_mask_ious: pd.DataFrame, history: pd.DataFrame | None,
                          val_history: pd.DataFrame | None, categories: pd.DataFrame,
                          predictions: pd.DataFrame, images: pd.DataFrame,
                          instances: pd.DataFrame, root, iou_type: str = "segm",
                          score_threshold: float = 0.5, split: str | None = "val",
                          grid_images: int = 4, pq_metrics: dict | None = None) -> Figure:
    """The evaluation at a glance, 8 analysis panels and a prediction grid.

    Row 1: AP breakdown (segm and bbox) | PR curves | matched-IoU histogram | IoU vs size.
    Row 2: per-class AP | PQ, SQ, RQ of all / things / stuff (``pq_metrics``: {group:
    {"pq", "sq", "rq", "n"}}). Row 3: training loss | detection confusion matrix.
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
    _plot_per_class_ap(figure.add_subplot(grid[1, :3]), coco_metrics)
    _plot_panoptic_quality(figure.add_subplot(grid[1, 3]), pq_metrics)
    _plot_loss(figure.add_subplot(grid[2, :2]), history, val_history)
    evaluated = split_images(images, split)
    counts = detection_confusion(categories, predictions, evaluated, instances,
                                 matched_mask_ious, score_threshold)
    _plot_confusion(figure.add_subplot(grid[2, 2:]), counts, score_threshold)
    cells = [figure.add_subplot(grid[3, k]) for k in range(min(grid_images, 4))]
    _prediction_grid(cells, evaluated, instances, predictions, categories, root,
                     score_threshold)
    figure.suptitle(f"Evaluation dashboard ({split or 'all'} split, {len(evaluated)} images)",
                    fontsize=15)
    return figure


def _plot_ap_breakdown(ax, coco_metrics: dict) -> None:
    """Grouped bars of AP, AP50, AP75, AP S/M/L per IoU type; -1 (nothing to measure) = n/a."""
    ax.set_title("COCO AP (IoU .50:.95 unless named)", fontsize=11)
    types = [t for t in ("segm", "bbox") if t in (coco_metrics or {})]
    if not types:
        return message(ax, "no COCO metrics")
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


_PQ_GROUPS = ("all", "things", "stuff")
_PQ_KEYS = (("pq", "PQ", "tab:purple"), ("sq", "SQ", "tab:cyan"), ("rq", "RQ", "tab:olive"))


def _plot_panoptic_quality(ax, pq_metrics: dict | None) -> None:
    """PQ, SQ and RQ bars per group; a group with no category scored (n = 0, e.g. stuff of
    an instance model) is an empty 'n/a' slot."""
    ax.set_title("panoptic quality", fontsize=11)
    groups = [g for g in _PQ_GROUPS if g in (pq_metrics or {})]
    if not groups:
        return message(ax, "no panoptic metrics")
    x, width = np.arange(len(groups)), 0.8 / len(_PQ_KEYS)
    for j, (key, label, color) in enumerate(_PQ_KEYS):
        values = [float(pq_metrics[g][key]) if pq_metrics[g].get("n") else None
                  for g in groups]
        _value_bars(ax, x + (j - 1) * width, values, width, label, color)
    ax.set_xticks(x, [f"{g}\n(n={pq_metrics[g].get('n', 0)})" for g in groups], fontsize=9)
    ax.set(ylim=(0, 1.15), ylabel="fraction")
    ax.legend(fontsize=8, loc="upper right", ncols=3)


def _plot_per_class_ap(ax, coco_metrics: dict) -> None:
    """Per-category AP@[.5:.95] bars (both IoU types), best first, named by category.

    Categories without ground truth (AP None) are left out and counted in the title.
    """
    rows = {t: coco_metrics[t].get("per_class_ap", [])
            for t in ("segm", "bbox") if t in (coco_metrics or {})}
    tables = {t: _known_ap(r) for t, r in rows.items()}
    absent = max((len(rows[t]) - len(tables[t]) for t in rows), default=0)
    left_out = f" ({count_of(absent, 'class', 'classes')} without ground truth left out)"
    ax.set_title("AP per class" + (left_out if absent else ""), fontsize=11)
    tables = {t: frame for t, frame in tables.items() if len(frame)}
    if not tables:
        return message(ax, "no class with ground truth")
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
        return message(ax, f"no precision/recall arrays for {iou_type}")
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
    names, colors = names_colors(categories)
    ids = arrays.get("category_ids") or sorted(names)
    for k, category_id in enumerate(ids[:curves.shape[1]]):
        if (curves[:, k] > -1).any():
            ax.plot(recall, curves[:, k], color=colors.get(int(category_id), "0.6"),
                    linewidth=0.8, alpha=0.45)


def _plot_iou_histogram(ax, matches: pd.DataFrame) -> None:
    """Stacked histogram of matched-pair mask IoU (same class vs another class)."""
    ax.set_title("mask IoU of matched (prediction, GT) pairs", fontsize=11)
    if len(matches) == 0:
        return message(ax, "no matched prediction / GT pairs")
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
        return message(ax, "no matched pairs to relate to object size")
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
        return message(ax, "no training history")
    column = "loss" if "loss" in history else next(
        (c for c in history.columns if c.startswith("loss")), None)
    if column is None:
        return message(ax, "training history has no loss column")
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
        return message(ax, "no detections and no ground truth to compare")
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
        draw_comparison(ax, load_picture(root, row), row, instances, predictions,
                        names, score_threshold)
        ax.set_title(f"image {row.image_id}: {ax.get_title()}", fontsize=9)
    for ax in axes[len(rows):]:
        ax.set_axis_off()
