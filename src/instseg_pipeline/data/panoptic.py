"""The tables as COCO panoptic files: one id PNG per image and a json of segments_info.

The inverse of `sources.coco_panoptic`: the rows of ``instances`` and ``stuff_segments``
of an image (non-overlapping segments, as a panoptic source gives them) are painted with
their ``annotation_id`` (the PNG segment id they were read from), so reading a panoptic
dataset and writing it back gives the same PNGs bit for bit.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from instseg_pipeline.data.masks import decode_strings, id_to_rgb


class OverlapError(ValueError):
    """Two segments of one image claim the same pixel: not a panoptic segmentation."""


def segments_id_map(image: Mapping, segments: pd.DataFrame) -> tuple[np.ndarray, list[dict]]:
    """int32 [H, W] ids (``annotation_id`` of each row, 0 = void) and the segments_info of
    one ``images`` row from its segment rows (things and stuff together)."""
    height, width = int(image["height"]), int(image["width"])
    ids = np.zeros((height, width), dtype=np.int32)
    masks = decode_strings([str(c) for c in segments["rle"]], height, width)
    info = []
    for mask, row in zip(masks, segments.itertuples(index=False)):
        mask = mask.astype(bool)
        if (ids[mask] != 0).any():
            raise OverlapError(f"image {image['image_id']}: segment {row.annotation_id} "
                               "overlaps another segment")
        ids[mask] = int(row.annotation_id)
        info.append({"id": int(row.annotation_id), "category_id": int(row.category_id),
                     "iscrowd": int(bool(row.iscrowd)), "area": int(row.area),
                     "bbox": [float(v) for v in row.bbox]})
    return ids, info


def write_panoptic(images: pd.DataFrame, segments: pd.DataFrame, categories: pd.DataFrame,
                   folder: str | Path, json_path: str | Path) -> dict:
    """Write ``<folder>/<image stem>.png`` per image and the panoptic json; return the json.

    ``segments``: rows of ``instances`` and ``stuff_segments`` (concatenated) of the images.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    groups = dict(tuple(segments.groupby("image_id")))
    annotations = []
    for image in images.to_dict("records"):
        ids, info = segments_id_map(image, groups.get(image["image_id"], segments.iloc[:0]))
        name = Path(str(image["file_name"])).with_suffix(".png").name
        Image.fromarray(id_to_rgb(ids), mode="RGB").save(folder / name)
        annotations.append({"image_id": int(image["image_id"]), "file_name": name,
                            "segments_info": info})
    data = {
        "images": [{"id": int(r.image_id), "file_name": Path(str(r.file_name)).name,
                    "width": int(r.width), "height": int(r.height)}
                   for r in images.itertuples(index=False)],
        "annotations": annotations,
        "categories": [{"id": int(r.category_id), "name": str(r.name),
                        "supercategory": str(r.supercategory), "isthing": int(bool(r.isthing))}
                       for r in categories.itertuples(index=False)],
    }
    Path(json_path).write_text(json.dumps(data), encoding="utf-8")
    return data
