"""Small pictures of a mask table (``instances``, ``predictions``) for Kedro-Viz previews:
the masks of a few images, each fitted into a square tile, side by side in one PNG."""
from __future__ import annotations

import base64
import logging
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from instseg_pipeline.data.images import ImageProblem, load_image
from instseg_pipeline.data.masks import decode_strings
from instseg_pipeline.viz.overlays import draw_labelled

logger = logging.getLogger(__name__)

CANVAS_GREY = 64  # the background of an image whose pixels are not at hand


def image_frames(rows: pd.DataFrame, ids: list[int], images: pd.DataFrame | None,
                 what: str) -> pd.DataFrame:
    """One row per id in ``ids`` order: image_id, height, width and file_name (None when
    unknown), from the ``images`` table when given, else the table's own height / width."""
    if images is not None:
        frame = images.set_index("image_id").reindex(ids)
        missing = frame.index[frame["height"].isna()].tolist()
        if missing:
            raise ValueError(f"{what}: image ids not in the images table: {missing[:10]}")
        return frame.reset_index()[["image_id", "height", "width", "file_name"]]
    if not {"height", "width"} <= set(rows.columns):
        raise ValueError(f"{what}: the table has no height / width columns; give the "
                         "images table (preview_args.images) to size its masks")
    frame = rows.drop_duplicates("image_id").set_index("image_id").reindex(ids)
    return frame.reset_index()[["image_id", "height", "width"]].assign(file_name=None)


def picture(root: str | None, file_name: str | None, height: int, width: int) -> np.ndarray:
    """uint8 [H, W, 3]: the image under ``root`` when it can be read, else a grey canvas."""
    if root is not None and file_name is not None:
        path = Path(root) / str(file_name)
        try:
            return load_image(path, expected_size=(width, height))[0]
        except (ImageProblem, OSError) as exc:
            logger.debug("preview on a blank canvas: %s", exc)
    return np.full((height, width, 3), CANVAS_GREY, np.uint8)


def fit(image: np.ndarray, masks: np.ndarray, tile: int) -> tuple[np.ndarray, np.ndarray]:
    """``image`` uint8 [H, W, 3] and ``masks`` uint8 [N, H, W] shrunk so the longer side is
    at most ``tile`` pixels (never enlarged); masks keep pixels at least half covered."""
    height, width = image.shape[:2]
    factor = min(1.0, tile / max(height, width))
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    if factor == 1.0:
        return image, masks
    small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    shrunk = [cv2.resize(m.astype(np.float32), size, interpolation=cv2.INTER_AREA) >= 0.5
              for m in masks]
    return small, np.array(shrunk, np.uint8).reshape(len(masks), size[1], size[0])


def mask_strip(rows: pd.DataFrame, frames: pd.DataFrame, root: str | None,
               tile: int) -> np.ndarray:
    """uint8 [tile, K * tile, 3]: per image of ``frames`` (see `image_frames`), its masks of
    ``rows`` tinted and outlined over its pixels, fitted and centred in a tile."""
    strip = np.zeros((tile, tile * max(len(frames), 1), 3), np.uint8)
    for k, frame in enumerate(frames.itertuples(index=False)):
        height, width = int(frame.height), int(frame.width)
        own = rows[rows["image_id"] == frame.image_id]
        masks = decode_strings([str(c) for c in own["rle"]], height, width)
        image, masks = fit(picture(root, frame.file_name, height, width), masks, tile)
        drawn = draw_labelled(image, masks, np.zeros((0, 4)), [])
        top, left = (tile - drawn.shape[0]) // 2, k * tile + (tile - drawn.shape[1]) // 2
        strip[top:top + drawn.shape[0], left:left + drawn.shape[1]] = drawn
    return strip


def png_base64(image: np.ndarray) -> str:
    """The base64 text of a PNG of ``image`` uint8 [H, W, 3] RGB."""
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"could not encode a {image.shape} preview as PNG")
    return base64.b64encode(encoded.tobytes()).decode("ascii")
