"""Semantic (stuff) label maps of the canonical tables, as a panoptic head learns them.

A map is int64 [H, W]: `THINGS_LABEL` (0) on every pixel of a thing instance (crowd
regions included), k in 1..S on the pixels of a stuff segment whose category has semantic
label k (`tables.stuff_mapping`), `IGNORE_LABEL` (255) elsewhere (void). Things override
stuff where they overlap; where stuff segments overlap, the later row wins.

Torch-free: the training dataset, evaluation and the figures build their maps here.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd

from instseg_pipeline.data.masks import decode_strings
from instseg_pipeline.data.tables import IGNORE_LABEL, THINGS_LABEL, stuff_mapping

# a semantic label must stay below IGNORE_LABEL; the dataset carries label + 1 in a uint8
# map through the augmentations, so S <= 254 also keeps that shift in range
MAX_STUFF_CLASSES = IGNORE_LABEL - 1


class ImageSegments(NamedTuple):
    """The compressed RLE strings of one image: every thing instance (crowd included) and
    the stuff segments with their semantic labels (1..S)."""

    things: list[str]
    stuff: list[str]
    stuff_labels: list[int]


def semantic_map(height: int, width: int, thing_masks: np.ndarray | None = None,
                 stuff_masks: np.ndarray | None = None,
                 stuff_labels: Sequence[int] = ()) -> np.ndarray:
    """int64 [height, width] semantic labels from binary masks.

    ``thing_masks`` [N, H, W] and ``stuff_masks`` [M, H, W] (any dtype, nonzero =
    foreground); ``stuff_labels`` holds the M semantic labels (1..S) of the stuff masks.
    Void (`IGNORE_LABEL`) where no mask covers a pixel.
    """
    out = np.full((int(height), int(width)), IGNORE_LABEL, dtype=np.int64)
    stuff_labels = [int(k) for k in stuff_labels]
    stuff_masks = _stack(stuff_masks, height, width, "stuff_masks")
    if len(stuff_masks) != len(stuff_labels):
        raise ValueError(f"{len(stuff_masks)} stuff masks but {len(stuff_labels)} stuff labels")
    bad = [k for k in stuff_labels if not 1 <= k <= MAX_STUFF_CLASSES]
    if bad:
        raise ValueError(f"stuff label {bad[0]} out of range 1..{MAX_STUFF_CLASSES}")
    for mask, label in zip(stuff_masks, stuff_labels):
        out[mask.astype(bool)] = label
    things = _stack(thing_masks, height, width, "thing_masks")
    if len(things):
        out[things.astype(bool).any(axis=0)] = THINGS_LABEL
    return out


def _stack(masks: np.ndarray | None, height: int, width: int, name: str) -> np.ndarray:
    """``masks`` as [N, height, width] (None: none), or a ValueError naming the shape."""
    if masks is None:
        return np.zeros((0, int(height), int(width)), dtype=np.uint8)
    masks = np.asarray(masks)
    if masks.ndim != 3 or masks.shape[1:] != (int(height), int(width)):
        raise ValueError(f"{name}: expected [N, {int(height)}, {int(width)}], got "
                         f"{list(masks.shape)}")
    return masks


def decode_semantic(segments: ImageSegments | None, height: int, width: int) -> np.ndarray:
    """int64 [height, width] semantic map of one image's `ImageSegments` (None: void
    everywhere)."""
    if segments is None:
        return np.full((int(height), int(width)), IGNORE_LABEL, dtype=np.int64)
    return semantic_map(height, width, decode_strings(segments.things, height, width),
                        decode_strings(segments.stuff, height, width), segments.stuff_labels)


def check_stuff_segments(stuff_segments: pd.DataFrame, categories: pd.DataFrame) -> None:
    """Raise ValueError naming the first stuff segment whose category is not a stuff
    category of ``categories`` (unknown, or ``isthing`` true)."""
    mapping = stuff_mapping(categories)
    if stuff_segments is None or not len(stuff_segments):
        return
    wrong = ~stuff_segments["category_id"].astype("int64").isin(list(mapping))
    if wrong.any():
        row = stuff_segments[wrong].iloc[0]
        known = int(row.category_id) in set(categories["category_id"].astype("int64"))
        why = "a thing category" if known else "not in the categories table"
        raise ValueError(f"stuff segment {int(row.instance_id)} (image {int(row.image_id)}) "
                         f"has category_id {int(row.category_id)}: {why}, not a stuff "
                         "category (isthing false)")


def group_segments(instances: pd.DataFrame, stuff_segments: pd.DataFrame | None,
                   categories: pd.DataFrame) -> dict[int, ImageSegments]:
    """{image_id: `ImageSegments`} of the tables, in table row order; every thing row
    (crowd included) counts as a thing. Raises ValueError for a stuff segment whose category
    is not a stuff category."""
    mapping = stuff_mapping(categories)
    if len(mapping) > MAX_STUFF_CLASSES:
        raise ValueError(f"{len(mapping)} stuff categories: a semantic map holds at most "
                         f"{MAX_STUFF_CLASSES}")
    grouped: dict[int, ImageSegments] = {}

    def entry(image_id) -> ImageSegments:
        return grouped.setdefault(int(image_id), ImageSegments([], [], []))

    for image_id, rle in zip(instances["image_id"], instances["rle"]):
        entry(image_id).things.append(str(rle))
    if stuff_segments is not None and len(stuff_segments):
        check_stuff_segments(stuff_segments, categories)
        for image_id, category_id, rle in zip(stuff_segments["image_id"],
                                              stuff_segments["category_id"],
                                              stuff_segments["rle"]):
            segments = entry(image_id)
            segments.stuff.append(str(rle))
            segments.stuff_labels.append(mapping[int(category_id)])
    return grouped


def semantic_maps(images: pd.DataFrame, instances: pd.DataFrame,
                  stuff_segments: pd.DataFrame | None, categories: pd.DataFrame
                  ) -> Iterator[tuple[int, np.ndarray]]:
    """(image_id, int64 [height, width] semantic map) for each row of ``images``, in order."""
    grouped = group_segments(instances[instances["image_id"].isin(images["image_id"])],
                             None if stuff_segments is None else stuff_segments[
                                 stuff_segments["image_id"].isin(images["image_id"])],
                             categories)
    for image_id, height, width in zip(images["image_id"], images["height"], images["width"]):
        yield int(image_id), decode_semantic(grouped.get(int(image_id)), int(height), int(width))
