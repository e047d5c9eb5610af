"""The panoptic overlay: chosen images as image | ground-truth panoptic | predicted panoptic.

Every segment is tinted and named: things in bright colours (their category's hue, a
little lighter or darker per instance so touching instances stay apart), stuff in muted
category colours, crowd regions grey, void left as the dimmed image. One legend per row
names the categories drawn. Built without pyplot, for Kedro's ``MatplotlibDataset``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import cv2
import numpy as np
import pandas as pd
from matplotlib.colors import hsv_to_rgb, rgb_to_hsv
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from instseg_pipeline.evaluation.errors import category_names
from instseg_pipeline.evaluation.panoptic import panoptic_gt_from_tables
from instseg_pipeline.viz.draw import (
    class_colors,
    class_name,
    clean,
    count_of,
    load_picture,
    notice_figure,
    outline,
)

CROWD_COLOR = (0.55, 0.55, 0.55)
_THING_ALPHA, _STUFF_ALPHA = 0.8, 0.6


def panoptic_overlay(images: pd.DataFrame, instances: pd.DataFrame,
                     stuff_segments: pd.DataFrame | None, categories: pd.DataFrame,
                     panoptic_predictions: Mapping, root, image_ids: Sequence[int]) -> Figure:
    """One row per image of ``image_ids``: image | ground truth | prediction, 3 axes each.

    Ground truth: the image's instances and stuff segments as evaluation builds it
    (`evaluation.panoptic.panoptic_gt_from_tables`); prediction: its annotation and id map
    in ``panoptic_predictions`` ({"annotations", "categories", "pngs"}, see
    `predict.panoptic.panoptic_outputs`). Raises ValueError naming an image id that is not
    in ``images`` or has no prediction.
    """
    ids = [int(i) for i in image_ids]
    if not ids:
        return notice_figure("Panoptic segmentation", "no images selected")
    rows = _rows(images, ids)
    predicted = {int(a["image_id"]): a for a in panoptic_predictions["annotations"]}
    lacking = [i for i in ids if i not in predicted]
    if lacking:
        raise ValueError(f"images {lacking} have no panoptic prediction")
    style = _Style(categories)
    aspect = float(rows["height"].iloc[0]) / float(rows["width"].iloc[0])
    figure = Figure(figsize=(14, 4.0 * aspect * len(rows) + 0.8), layout="constrained")
    axes = figure.subplots(len(rows), 3, squeeze=False)
    gt_inst = dict(tuple(instances.groupby("image_id")))
    gt_stuff = dict(tuple(stuff_segments.groupby("image_id"))) if stuff_segments is not None \
        else {}
    for row_axes, row in zip(axes, rows.to_dict("records")):
        image_id = int(row["image_id"])
        picture = load_picture(root, pd.Series(row))
        gt_ids, gt_segments = panoptic_gt_from_tables(
            row, gt_inst.get(image_id, instances.iloc[:0]), gt_stuff.get(image_id))
        annotation = predicted[image_id]
        pred_ids = np.asarray(panoptic_predictions["pngs"][annotation["file_name"]])
        _draw_row(row_axes, picture, row, (gt_ids, gt_segments),
                  (pred_ids, annotation["segments_info"]), style)
    figure.suptitle("Panoptic segmentation: things bright, stuff muted, crowd grey, void "
                    "dimmed", fontsize=13)
    return figure


def _rows(images: pd.DataFrame, ids: list[int]) -> pd.DataFrame:
    unknown = sorted(set(ids) - {int(i) for i in images["image_id"]})
    if unknown:
        raise ValueError(f"image ids {unknown} are not in the images table")
    return images.set_index("image_id").loc[ids].reset_index()


class _Style:
    """Names and colours of the categories: bright for things, muted for stuff."""

    def __init__(self, categories: pd.DataFrame):
        self.names = category_names(categories)
        things = categories["isthing"].astype(bool) if "isthing" in categories else \
            pd.Series(True, index=categories.index)
        self.stuff = {int(c) for c in categories.loc[~things, "category_id"]}
        self.base = class_colors(categories["category_id"])
        self.colors = {c: _muted(rgb) if c in self.stuff else rgb for c, rgb in self.base.items()}

    def segment_color(self, segment: Mapping, index: int) -> tuple:
        category = int(segment["category_id"])
        if segment.get("iscrowd"):
            return CROWD_COLOR
        color = self.colors.get(category, (0.8, 0.8, 0.8))
        return color if category in self.stuff else _jitter(color, index)

    def caption(self, segment: Mapping) -> str:
        name = class_name(self.names, segment["category_id"])
        return f"{name} (crowd)" if segment.get("iscrowd") else name


def _muted(rgb) -> tuple:
    """The colour with little saturation and a mid brightness: a background tone."""
    h, s, v = rgb_to_hsv(np.asarray(rgb, dtype=np.float64))
    return tuple(hsv_to_rgb((h, 0.45 * s, 0.5 + 0.3 * v)))


def _jitter(rgb, index: int) -> tuple:
    """The category's colour, lighter or darker per instance (same hue)."""
    h, s, v = rgb_to_hsv(np.asarray(rgb, dtype=np.float64))
    step = (0.0, -0.18, 0.12, -0.3, 0.06)[index % 5]
    return tuple(hsv_to_rgb((h, s, float(np.clip(v + step, 0.25, 1.0)))))


def _draw_row(axes, picture: np.ndarray, row: Mapping, gt, pred, style: _Style) -> None:
    axes[0].imshow(picture)
    axes[0].set_title(f"image {row['image_id']}", fontsize=9)
    clean(axes[0])
    shown = set()
    for ax, (ids, segments), side in ((axes[1], gt, "ground truth"),
                                      (axes[2], pred, "prediction")):
        if ids.shape != picture.shape[:2]:
            raise ValueError(f"image {row['image_id']}: {side} id map is "
                             f"{list(ids.shape)}, the image {list(picture.shape[:2])}")
        _draw_segments(ax, picture, ids, segments, style)
        stuff = sum(int(s["category_id"]) in style.stuff for s in segments)
        ax.set_title(f"{side}: {count_of(len(segments) - stuff, 'thing')}, "
                     f"{count_of(stuff, 'stuff segment')}", fontsize=9)
        shown.update(int(s["category_id"]) for s in segments)
    _legend(axes[2], shown, style)


def _draw_segments(ax, picture: np.ndarray, ids: np.ndarray, segments: Sequence[Mapping],
                   style: _Style) -> None:
    """Tint every segment of an id map, outline it and write its category on it."""
    grey = picture.mean(axis=2, keepdims=True).repeat(3, axis=2)
    out = grey * 0.6
    drawn = []
    for index, segment in enumerate(segments):
        region = ids == int(segment["id"])
        if not region.any():
            continue
        color = np.asarray(style.segment_color(segment, index), dtype=np.float32)
        alpha = _STUFF_ALPHA if int(segment["category_id"]) in style.stuff else _THING_ALPHA
        # over grey, not the picture: the colour reads as the category, not a mix with it
        out[region] = (1 - alpha) * grey[region] + alpha * color
        drawn.append((region, segment, tuple(color)))
    ax.imshow(out.clip(0, 1))
    for region, segment, color in drawn:
        outline(ax, region.astype(np.uint8), color, width=1.0)
        x, y = _label_point(region)
        ax.text(x, y, style.caption(segment), fontsize=6.5, color="white", ha="center",
                va="center", clip_on=True,
                bbox={"facecolor": color, "alpha": 0.85, "pad": 1.0, "linewidth": 0})
    clean(ax)


def _label_point(region: np.ndarray) -> tuple[int, int]:
    """(x, y) of the pixel of a bool [H, W] region farthest from its edge (and the image's),
    the one nearest the region's centre among near ties (a strip is named mid-way): a
    caption there stays on the segment, whatever its shape."""
    padded = np.pad(region.astype(np.uint8), 1)  # the image edge counts as outside too
    depth = cv2.distanceTransform(padded, cv2.DIST_L2, 3)[1:-1, 1:-1]
    ys, xs = np.nonzero(depth >= depth.max() - 0.5)
    centre_y, centre_x = np.argwhere(region).mean(axis=0)
    best = int(np.argmin((ys - centre_y) ** 2 + (xs - centre_x) ** 2))
    return int(xs[best]), int(ys[best])


def _legend(ax, category_ids: set[int], style: _Style) -> None:
    things = sorted(c for c in category_ids if c not in style.stuff)
    stuff = sorted(c for c in category_ids if c in style.stuff)
    handles = [Patch(color=style.colors.get(c, (0.8, 0.8, 0.8)),
                     label=f"{class_name(style.names, c)}{' (stuff)' if c in style.stuff else ''}")
               for c in things + stuff]
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7,
                  frameon=False, title="category", title_fontsize=8)
