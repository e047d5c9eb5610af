"""The canonical tables every source produces and every stage reads.

- ``images``: image_id, file_name (relative to the source root), width, height, split, source
- ``instances``: instance_id, image_id, category_id, bbox (COCO x, y, w, h), area, iscrowd,
  rle (compressed COCO RLE counts string of the full-size mask; its size is the image's)
- ``categories``: category_id, name, supercategory, isthing

Nothing here imports torch: ingestion and evaluation stay fast to start.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd

IMAGE_COLUMNS = ["image_id", "file_name", "width", "height", "split", "source"]
INSTANCE_COLUMNS = ["instance_id", "image_id", "category_id", "bbox", "area", "iscrowd", "rle"]
CATEGORY_COLUMNS = ["category_id", "name", "supercategory", "isthing"]

_IMAGE_DTYPES = {"image_id": "int64", "file_name": "string", "width": "int64",
                 "height": "int64", "split": "string", "source": "string"}
_INSTANCE_DTYPES = {"instance_id": "int64", "image_id": "int64", "category_id": "int64",
                    "area": "int64", "iscrowd": "bool", "rle": "string"}
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


def make_instances(rows: Iterable[Mapping]) -> pd.DataFrame:
    """Build the ``instances`` table; ``bbox`` is a list of four floats per row."""
    frame = _frame(rows, INSTANCE_COLUMNS, _INSTANCE_DTYPES)
    frame["bbox"] = [[float(v) for v in box] for box in frame["bbox"]]
    return frame


def instances_from_columns(columns: Mapping[str, list]) -> pd.DataFrame:
    """The ``instances`` table from ``{column: list}`` (faster than rows for large sources);
    ``bbox`` lists are taken as they are when already four floats each."""
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
                 categories: pd.DataFrame) -> None:
    """Raise `TableContractError` when the three tables do not fit together."""
    for name, frame, columns in (("images", images, IMAGE_COLUMNS),
                                 ("instances", instances, INSTANCE_COLUMNS),
                                 ("categories", categories, CATEGORY_COLUMNS)):
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise TableContractError(f"table '{name}' lacks columns {missing}")
    for name, frame, key in (("images", images, "image_id"),
                             ("instances", instances, "instance_id"),
                             ("categories", categories, "category_id")):
        dupes = frame[key][frame[key].duplicated()].unique().tolist()
        if dupes:
            raise TableContractError(f"table '{name}' has duplicate {key}s {dupes[:10]}")
    dangling = ~instances["image_id"].isin(images["image_id"])
    if dangling.any():
        bad = instances.loc[dangling, "instance_id"].tolist()[:10]
        raise TableContractError(f"instances {bad} refer to image ids not in 'images'")
    unknown = ~instances["category_id"].isin(categories["category_id"])
    if unknown.any():
        bad = instances.loc[unknown, "instance_id"].tolist()[:10]
        raise TableContractError(f"instances {bad} refer to category ids not in 'categories'")


def label_mapping(categories: pd.DataFrame) -> dict[int, int]:
    """Contiguous model labels 1..K for (possibly non-contiguous) category ids; 0 = background."""
    ids = sorted(int(c) for c in categories["category_id"])
    return {cat: label for label, cat in enumerate(ids, start=1)}


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
