"""The canonical tables every source produces and every stage reads.

- ``images``: image_id, file_name (relative to the source root), width, height, split, source
- ``instances``: instance_id, image_id, category_id, bbox (COCO x, y, w, h), area, iscrowd,
  rle (compressed COCO RLE counts string of the full-size mask; its size is the image's),
  annotation_id (the source's own id of the object: a COCO annotation id, a panoptic PNG
  segment id; the instance_id where the source has none), mask_source (where the mask came
  from: ``annotated`` by a person, or a pseudo-mask made from the box, `PSEUDO`:
  ``grabcut``, ``box``, ``sam``; ``annotated`` where a reader does not say)
- ``stuff_segments`` (panoptic sources; empty for the others): the same columns, one row
  per stuff segment (amorphous regions: sky, road), categories with ``isthing`` false
- ``categories``: category_id, name, supercategory, isthing (models learn the things only)

Nothing here imports torch: ingestion and evaluation stay fast to start.
"""
from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd

IMAGE_COLUMNS = ["image_id", "file_name", "width", "height", "split", "source"]
INSTANCE_COLUMNS = ["instance_id", "image_id", "category_id", "bbox", "area", "iscrowd", "rle",
                    "annotation_id", "mask_source"]
CATEGORY_COLUMNS = ["category_id", "name", "supercategory", "isthing"]

ANNOTATED = "annotated"
PSEUDO = ("grabcut", "box", "sam")      # masks made from a box, not drawn by a person
MASK_SOURCES = (ANNOTATED, *PSEUDO)

_IMAGE_DTYPES = {"image_id": "int64", "file_name": "string", "width": "int64",
                 "height": "int64", "split": "string", "source": "string"}
_INSTANCE_DTYPES = {"instance_id": "int64", "image_id": "int64", "category_id": "int64",
                    "area": "int64", "iscrowd": "bool", "rle": "string",
                    "annotation_id": "int64", "mask_source": "string"}
_CATEGORY_DTYPES = {"category_id": "int64", "name": "string", "supercategory": "string",
                    "isthing": "bool"}


class TableContractError(ValueError):
    """The tables break the contract (missing columns, duplicate or dangling ids)."""


def _frame(rows: Iterable[Mapping], columns: list[str], dtypes: dict) -> pd.DataFrame:
    frame = pd.DataFrame(list(rows), columns=columns)
    return frame.astype(dtypes)


def make_images(rows: Iterable[Mapping]) -> pd.DataFrame:
    """Build the ``images`` table from dict rows (extra keys are dropped)."""
    return _frame(rows, IMAGE_COLUMNS, _IMAGE_DTYPES)


def _own_ids(rows: Iterable[Mapping]) -> list[Mapping]:
    """Rows with ``annotation_id`` (the instance_id where a source gives none) and
    ``mask_source`` (``annotated`` where it gives none)."""
    return [row if row.get("annotation_id") is not None and row.get("mask_source") is not None
            else {**row, "annotation_id": _first(row.get("annotation_id"), row["instance_id"]),
                  "mask_source": _first(row.get("mask_source"), ANNOTATED)}
            for row in rows]


def _first(value, default):
    return default if value is None else value


def make_instances(rows: Iterable[Mapping]) -> pd.DataFrame:
    """Build the ``instances`` (or ``stuff_segments``) table; ``bbox`` is a list of four
    floats per row; ``annotation_id`` defaults to the instance_id, ``mask_source`` to
    ``annotated``."""
    frame = _frame(_own_ids(rows), INSTANCE_COLUMNS, _INSTANCE_DTYPES)
    frame["bbox"] = [[float(v) for v in box] for box in frame["bbox"]]
    return frame


def instances_from_columns(columns: Mapping[str, list]) -> pd.DataFrame:
    """The ``instances`` table from ``{column: list}`` (faster than rows for large sources);
    ``bbox`` lists are taken as they are when already four floats each; ``annotation_id``
    defaults to the instance_id, ``mask_source`` to ``annotated``."""
    columns = {"annotation_id": columns["instance_id"],
               "mask_source": [ANNOTATED] * len(columns["instance_id"]), **columns}
    frame = pd.DataFrame({name: columns[name] for name in INSTANCE_COLUMNS}).astype(
        _INSTANCE_DTYPES)
    boxes = frame["bbox"].tolist()
    if not all(type(v) is float for box in boxes for v in box):
        frame["bbox"] = [[float(v) for v in box] for box in boxes]
    return frame


def make_categories(rows: Iterable[Mapping]) -> pd.DataFrame:
    """Build the ``categories`` table sorted by category id."""
    frame = _frame(rows, CATEGORY_COLUMNS, _CATEGORY_DTYPES)
    return frame.sort_values("category_id", ignore_index=True)


def check_tables(images: pd.DataFrame, instances: pd.DataFrame,
                 categories: pd.DataFrame, stuff_segments: pd.DataFrame | None = None) -> None:
    """Raise `TableContractError` when the tables do not fit together."""
    segments = [("instances", instances)]
    if stuff_segments is not None:
        segments.append(("stuff_segments", stuff_segments))
    for name, frame, columns in (("images", images, IMAGE_COLUMNS),
                                 *((n, f, INSTANCE_COLUMNS) for n, f in segments),
                                 ("categories", categories, CATEGORY_COLUMNS)):
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise TableContractError(f"table '{name}' lacks columns {missing}")
    for name, frame, key in (("images", images, "image_id"),
                             *((n, f, "instance_id") for n, f in segments),
                             ("categories", categories, "category_id")):
        dupes = frame[key][frame[key].duplicated()].unique().tolist()
        if dupes:
            raise TableContractError(f"table '{name}' has duplicate {key}s {dupes[:10]}")
    for name, frame in segments:
        _check_references(name, frame, images, categories)
        _check_mask_sources(name, frame)


def _check_mask_sources(name: str, frame: pd.DataFrame) -> None:
    unknown = ~frame["mask_source"].isin(MASK_SOURCES)
    if unknown.any():
        values = sorted(map(str, frame.loc[unknown, "mask_source"].unique()))
        bad = frame.loc[unknown, "instance_id"].tolist()[:10]
        raise TableContractError(f"{name} {bad} have mask_source {values}, not one of "
                                 f"{', '.join(MASK_SOURCES)}")


def with_mask_source(instances: pd.DataFrame) -> pd.DataFrame:
    """``instances`` with a ``mask_source`` column: tables written before it existed (every
    mask annotated) get ``annotated``; others are returned as they are."""
    if "mask_source" in instances.columns:
        return instances
    return instances.assign(mask_source=pd.Series(ANNOTATED, index=instances.index,
                                                  dtype="string"))


def _check_references(name: str, frame: pd.DataFrame, images: pd.DataFrame,
                      categories: pd.DataFrame) -> None:
    dangling = ~frame["image_id"].isin(images["image_id"])
    if dangling.any():
        bad = frame.loc[dangling, "instance_id"].tolist()[:10]
        raise TableContractError(f"{name} {bad} refer to image ids not in 'images'")
    unknown = ~frame["category_id"].isin(categories["category_id"])
    if unknown.any():
        bad = frame.loc[unknown, "instance_id"].tolist()[:10]
        raise TableContractError(f"{name} {bad} refer to category ids not in 'categories'")


def thing_categories(categories: pd.DataFrame) -> pd.DataFrame:
    """The categories instance models learn (``isthing``; stuff is for panoptic heads)."""
    if "isthing" not in categories.columns:
        return categories
    return categories[categories["isthing"].astype(bool)]


def label_mapping(categories: pd.DataFrame) -> dict[int, int]:
    """Contiguous model labels 1..K for the (possibly non-contiguous) ids of the thing
    categories; 0 = background."""
    ids = sorted(int(c) for c in thing_categories(categories)["category_id"])
    return {cat: label for label, cat in enumerate(ids, start=1)}


def stuff_mapping(categories: pd.DataFrame) -> dict[int, int]:
    """Semantic labels 1..S of a panoptic head for the stuff category ids (sorted); label 0
    is every thing pixel, `IGNORE_LABEL` is void."""
    if "isthing" not in categories.columns:
        return {}
    stuff = categories[~categories["isthing"].astype(bool)]
    ids = sorted(int(c) for c in stuff["category_id"])
    return {cat: label for label, cat in enumerate(ids, start=1)}


# a semantic target pixel that no loss reads (void, and the padding of augmentations)
IGNORE_LABEL = 255
THINGS_LABEL = 0


def select_split(images: pd.DataFrame, instances: pd.DataFrame,
                 split: str | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The images of one split (all when ``split`` is None) and their instances."""
    if split is not None:
        images = images[images["split"] == split]
    return images, instances[instances["image_id"].isin(images["image_id"])]


def tables_to_coco_dict(images: pd.DataFrame, instances: pd.DataFrame,
                        categories: pd.DataFrame, split: str | None = None) -> dict:
    """A COCO ground-truth dict (segmentations as compressed RLE) built from the tables."""
    images, instances = select_split(images, instances, split)
    sizes = {int(i): (int(h), int(w)) for i, h, w in
             zip(images["image_id"], images["height"], images["width"])}
    coco_images = [{"id": int(r.image_id), "file_name": str(r.file_name),
                    "width": int(r.width), "height": int(r.height)}
                   for r in images.itertuples(index=False)]
    annotations = []
    for r in instances.itertuples(index=False):
        height, width = sizes[int(r.image_id)]
        annotations.append({
            "id": int(r.instance_id), "image_id": int(r.image_id),
            "category_id": int(r.category_id), "bbox": [float(v) for v in r.bbox],
            "area": float(r.area), "iscrowd": int(bool(r.iscrowd)),
            "segmentation": {"size": [height, width], "counts": str(r.rle)},
        })
    coco_categories = [{"id": int(r.category_id), "name": str(r.name),
                        "supercategory": str(r.supercategory)}
                       for r in categories.itertuples(index=False)]
    return {"images": coco_images, "annotations": annotations, "categories": coco_categories}


def tables_to_coco(images: pd.DataFrame, instances: pd.DataFrame,
                   categories: pd.DataFrame, split: str | None = None):
    """A pycocotools ``COCO`` ground-truth object built from the tables (index created)."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = tables_to_coco_dict(images, instances, categories, split)
    # pycocotools prints "creating index..." to stdout; a CLI's stdout must stay pure output
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def empty_like_contract() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Three empty tables with the contract's columns and dtypes."""
    return make_images([]), make_instances([]), make_categories([])


def bbox_array(instances: pd.DataFrame) -> np.ndarray:
    """float64 [N, 4] COCO boxes of an instances table."""
    if len(instances) == 0:
        return np.zeros((0, 4), dtype=np.float64)
    return np.asarray(instances["bbox"].tolist(), dtype=np.float64)
