"""Panoptic inference: instance predictions + a semantic map -> one non-overlapping id map.

The combination of Panoptic FPN (Kirillov et al., 2019): instances paint first, best score
first, each keeping only still-free pixels and dropped when more than ``overlap_threshold``
of it is already taken (`evaluation.panoptic.instances_to_panoptic`); then every stuff label
of the semantic map claims its still-free pixels as one segment when at least
``stuff_min_area`` of them remain. The semantic map's label 0 (things) never makes a
segment: a thing pixel no instance claimed stays void.

`panoptic_outputs` applies it to every image of a predictions table (and the semantic
maps of a semantic family) and returns COCO panoptic predictions: the json's annotations
and categories, and one id map per PNG file name (the ``panoptic_predictions`` dataset).

numpy and pandas only: serving, evaluation and the pipelines share it without torch.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import PurePath

import numpy as np
import pandas as pd

from instseg_pipeline.data.masks import decode_strings
from instseg_pipeline.data.tables import THINGS_LABEL
from instseg_pipeline.evaluation.panoptic import (
    _segment_info,
    instances_to_panoptic,
    panoptic_categories,
)

logger = logging.getLogger(__name__)


def combine_panoptic(masks: np.ndarray, scores: np.ndarray, category_ids: np.ndarray,
                     semantic: np.ndarray | None = None,
                     stuff_category_ids: Mapping[int, int] | None = None, *,
                     score_threshold: float = 0.5, overlap_threshold: float = 0.5,
                     min_area: int = 1, stuff_min_area: int = 64
                     ) -> tuple[np.ndarray, list[dict]]:
    """One image's panoptic segmentation.

    masks: binary uint8/bool [N, H, W]; scores: float [N]; category_ids: int [N] (dataset
    ids); semantic: int [H, W] labels 0..S of a semantic family, or None (things only);
    stuff_category_ids: {semantic label k >= 1: stuff category id}. Instances below
    ``score_threshold`` are left out; ``min_area``: the fewest free pixels a thing keeps.
    Returns (id_map int32 [H, W], 0 = void, segment ids 1..K; segments_info dicts with id,
    category_id, iscrowd 0, area, bbox and, for things, score).
    """
    if semantic is not None and np.asarray(masks).ndim == 3 \
            and tuple(semantic.shape) != tuple(np.asarray(masks).shape[1:]):
        raise ValueError(f"semantic map {tuple(semantic.shape)} and masks "
                         f"{tuple(np.asarray(masks).shape[1:])} differ in size")
    id_map, segments = instances_to_panoptic(masks, scores, category_ids,
                                             overlap_threshold=overlap_threshold,
                                             min_area=min_area,
                                             score_threshold=score_threshold)
    if semantic is None:
        return id_map, segments
    mapping = {int(k): int(v) for k, v in (stuff_category_ids or {}).items()}
    semantic = np.asarray(semantic)
    free = id_map == 0
    for label in np.unique(semantic[free]):
        label = int(label)
        if label == THINGS_LABEL:
            continue
        if label not in mapping:
            raise ValueError(f"semantic label {label} has no stuff category "
                             f"(stuff_category_ids has {sorted(mapping)})")
        region = free & (semantic == label)
        if int(region.sum()) < stuff_min_area:
            continue
        segment_id = len(segments) + 1
        id_map[region] = segment_id
        segments.append(_segment_info(segment_id, mapping[label], region, False))
    return id_map, segments


def png_names(images: pd.DataFrame) -> dict[int, str]:
    """{image_id: PNG file name}: the image's own name with ``.png`` (as
    `data.panoptic.write_panoptic` names ground-truth PNGs), ``<stem>_<image_id>.png`` for
    a name an earlier row of ``images`` already took (same name in two folders)."""
    names: dict[int, str] = {}
    taken: set[str] = set()
    for image_id, file_name in zip(images["image_id"].tolist(), images["file_name"].tolist()):
        name = PurePath(str(file_name)).with_suffix(".png").name
        if name in taken:
            name = f"{PurePath(name).stem}_{int(image_id)}.png"
        taken.add(name)
        names[int(image_id)] = name
    return names


def _compact(id_map: np.ndarray) -> np.ndarray:
    """The id map in the smallest unsigned type that holds its ids (a whole split is held
    in memory until it is saved)."""
    top = int(id_map.max()) if id_map.size else 0
    return id_map.astype(np.uint8 if top < 2 ** 8 else np.uint16 if top < 2 ** 16 else np.int32)


def _predicted_categories(categories: pd.DataFrame,
                          stuff_category_ids: Mapping[int, int] | None) -> list[dict]:
    """The panoptic categories the predictions cover: the things, and the stuff categories
    of the semantic head (none for an instance model)."""
    stuff = {int(c) for c in (stuff_category_ids or {}).values()}
    table = panoptic_categories(categories)
    unknown = sorted(stuff - {c["id"] for c in table if not c["isthing"]})
    if unknown:
        raise ValueError(f"the model's stuff_category_ids name categories {unknown} that are "
                         "not stuff categories of the categories table")
    return [c for c in table if c["isthing"] or c["id"] in stuff]


def panoptic_outputs(images: pd.DataFrame, predictions: pd.DataFrame,
                     categories: pd.DataFrame,
                     semantic_maps: Iterable[tuple[int, np.ndarray]] | None = None,
                     stuff_category_ids: Mapping[int, int] | None = None,
                     **options) -> dict:
    """COCO panoptic predictions of ``images`` (every row).

    predictions: the predictions table (image_id, category_id, score, rle at the image
    size); semantic_maps: (image_id, int [H, W] labels 0..S) once per image, in any order,
    for a semantic family (None: things only); stuff_category_ids: {label k: stuff category
    id}; options: those of `combine_panoptic`. Returns ``{"annotations": [{"image_id",
    "file_name", "segments_info"}] (table order), "categories": [{"id", "name", "isthing"}]
    (the things, + the model's stuff), "pngs": {file_name: unsigned [H, W] id map}}``.
    """
    covered = _predicted_categories(categories, stuff_category_ids
                                    if semantic_maps is not None else None)
    rows = {int(r["image_id"]): r for r in images.to_dict("records")}
    names = png_names(images)
    groups = dict(tuple(predictions.groupby("image_id")))
    empty = predictions.iloc[:0]
    pairs = semantic_maps if semantic_maps is not None else ((i, None) for i in rows)
    annotations: dict[int, dict] = {}
    pngs: dict[str, np.ndarray] = {}
    for image_id, semantic in pairs:
        image_id = int(image_id)
        if image_id not in rows or image_id in annotations:
            raise ValueError(f"semantic map for image {image_id}: not in the images table "
                             "or given twice")
        row = rows[image_id]
        id_map, segments = _image_panoptic(row, groups.get(image_id, empty), semantic,
                                           stuff_category_ids, options)
        annotations[image_id] = {"image_id": image_id, "file_name": names[image_id],
                                 "segments_info": segments}
        pngs[names[image_id]] = _compact(id_map)
    missing = sorted(set(rows) - set(annotations))
    if missing:
        raise ValueError(f"no semantic map for images {missing[:10]}")
    logger.info("panoptic segmentation of %d images (%s)", len(rows),
                "things and stuff" if semantic_maps is not None else "things only")
    return {"annotations": [annotations[i] for i in rows], "categories": covered, "pngs": pngs}


def _image_panoptic(row: Mapping, predictions: pd.DataFrame, semantic: np.ndarray | None,
                    stuff_category_ids: Mapping[int, int] | None,
                    options: Mapping) -> tuple[np.ndarray, list[dict]]:
    """One image's id map and segments_info from its prediction rows (+ semantic map)."""
    height, width = int(row["height"]), int(row["width"])
    if semantic is not None and tuple(np.shape(semantic)) != (height, width):
        raise ValueError(f"image {row['image_id']}: semantic map is "
                         f"{tuple(np.shape(semantic))}, the image {(height, width)}")
    masks = decode_strings([str(c) for c in predictions["rle"]], height, width)
    return combine_panoptic(masks, predictions["score"].to_numpy(dtype=np.float64),
                            predictions["category_id"].to_numpy(), semantic,
                            stuff_category_ids, **options)
