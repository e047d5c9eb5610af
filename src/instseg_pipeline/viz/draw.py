"""Drawing primitives shared by the evaluation figures (`suite`, `dashboard`, `galleries`):
colours, image and mask loading, tinted masks, contours, captions and notice panels.

Everything draws on a given matplotlib ``Axes`` or returns a `Figure` built without pyplot
(no GUI backend, no global state).
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from matplotlib import colormaps, patheffects
from matplotlib.colors import hsv_to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Polygon

from instseg_pipeline.data.images import load_image
from instseg_pipeline.data.masks import decode_strings
from instseg_pipeline.evaluation.errors import category_names, non_crowd

GT_STYLE = {"color": "white", "style": (0, (3, 2)), "width": 1.3}


# ==================================================================== colours and names

def class_colors(category_ids) -> dict[int, tuple]:
    """A distinct RGB colour per category id (tab10 up to 10 ids, spread hues beyond)."""
    ids = sorted({int(c) for c in category_ids})
    if len(ids) <= 10:
        return {c: colormaps["tab10"](i)[:3] for i, c in enumerate(ids)}
    # Golden-ratio hue steps (with alternating brightness) keep neighbouring ids apart.
    return {c: tuple(hsv_to_rgb(((i * 0.618034) % 1.0, 0.8 - 0.25 * (i % 2),
                                 0.95 - 0.3 * (i % 3 == 2)))) for i, c in enumerate(ids)}


def instance_colors(count: int) -> list[tuple]:
    return [colormaps["tab10"](k % 10)[:3] for k in range(count)]


def names_colors(categories: pd.DataFrame) -> tuple[dict, dict]:
    """(category_id -> name, category_id -> RGB colour) of the ``categories`` table."""
    return category_names(categories), class_colors(categories["category_id"])


def class_name(names: dict, category_id) -> str:
    return names.get(int(category_id), f"class {int(category_id)}")


def count_of(number: int, word: str, plural: str | None = None) -> str:
    """"1 image", "3 images" (``plural`` for irregular words)."""
    return f"{number} {word if number == 1 else plural or word + 's'}"


def prediction_captions(frame: pd.DataFrame, names: dict) -> list[str]:
    return [f"{class_name(names, c)} {s:.2f}"
            for c, s in zip(frame["category_id"], frame["score"])]


def by_score(predictions: pd.DataFrame, score_threshold: float) -> pd.DataFrame:
    """Confident predictions, lowest score first so the best is drawn on top."""
    confident = predictions[predictions["score"] >= score_threshold]
    return confident.sort_values("score", kind="stable")


# ==================================================================== pixels

def load_picture(root: str | Path, row) -> np.ndarray:
    """float32 [H, W, 3] in [0, 1] of one ``images`` row."""
    pixels, _ = load_image(Path(root) / str(row.file_name),
                           expected_size=(int(row.width), int(row.height)))
    return pixels.astype(np.float32) / 255.0


def decode_masks(frame: pd.DataFrame, height: int, width: int) -> np.ndarray:
    """uint8 [N, H, W] masks of a table's ``rle`` column."""
    return decode_strings([str(c) for c in frame["rle"]], int(height), int(width))


def tint(picture: np.ndarray, masks: np.ndarray, colors, alpha: float = 0.45) -> np.ndarray:
    """float32 [H, W, 3]: ``picture`` with each uint8 [H, W] mask blended in its colour."""
    out = picture.copy()
    for mask, color in zip(masks, colors):
        region = mask.astype(bool)
        out[region] = (1 - alpha) * out[region] + alpha * np.asarray(color, np.float32)
    return out


# ==================================================================== on an Axes

def outline(ax, mask: np.ndarray, color, style="-", width: float = 1.4) -> None:
    """Draw the outer contours of a uint8 [H, W] mask, edged in black to show on any
    background."""
    contours, _ = cv2.findContours(np.ascontiguousarray(mask, dtype=np.uint8),
                                   cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    edge = [patheffects.withStroke(linewidth=width + 1.2, foreground="black", alpha=0.6)]
    for contour in contours:
        if len(contour) >= 2:
            ax.add_patch(Polygon(contour[:, 0, :], closed=True, fill=False, edgecolor=color,
                                 linestyle=style, linewidth=width, path_effects=edge))


def draw_outlines(ax, masks: np.ndarray, style: dict) -> None:
    """Contours of uint8 [N, H, W] masks in one ``style`` (see `GT_STYLE`)."""
    for mask in masks:
        outline(ax, mask, style["color"], style["style"], style["width"])


def draw_instances(ax, picture: np.ndarray, masks: np.ndarray, captions, colors) -> None:
    """Tinted masks, their contours and one caption each on ``ax``."""
    ax.imshow(tint(picture, masks, colors).clip(0, 1))
    for mask, color in zip(masks, colors):
        outline(ax, mask, color)
    # Captions go on top of every outline, in reverse order so the best-scored (drawn
    # last) claims its place first.
    order = list(range(len(masks)))[::-1]
    points = _caption_points(masks[order], [captions[k] for k in order])
    for k, point in zip(order, points):
        if point is not None:
            _caption(ax, point, captions[k], colors[k], picture.shape[1])
    clean(ax)


def draw_comparison(ax, picture: np.ndarray, row, instances: pd.DataFrame,
                    predictions: pd.DataFrame, names: dict, score_threshold: float) -> None:
    """Confident predictions tinted and captioned; non-crowd GT outlined dashed white."""
    gt = non_crowd(instances[instances["image_id"] == row.image_id])
    pred = by_score(predictions[predictions["image_id"] == row.image_id], score_threshold)
    draw_instances(ax, picture, decode_masks(pred, row.height, row.width),
                   prediction_captions(pred, names), instance_colors(len(pred)))
    draw_outlines(ax, decode_masks(gt, row.height, row.width), GT_STYLE)
    ax.set_title(f"{len(pred)} predicted, {len(gt)} GT (dashed)", fontsize=9)


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


def clean(ax) -> None:
    """No ticks: image panels have no meaningful axes."""
    ax.set_xticks([])
    ax.set_yticks([])


# ==================================================================== nothing to draw

def message(ax, text: str) -> None:
    """A panel with nothing to plot says so instead of staying empty."""
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=10, color="0.35",
            wrap=True, transform=ax.transAxes)
    clean(ax)


def notice_figure(title: str, text: str) -> Figure:
    """A small figure that only says why there is nothing to show."""
    figure = Figure(figsize=(8, 2.4), layout="constrained")
    ax = figure.add_subplot()
    ax.set_title(title, fontsize=12)
    message(ax, text)
    return figure
