"""COCO panoptic source: a panoptic json, its PNG folder and the images, as the tables.

Format (COCO panoptic, Kirillov et al. 2019): per image one annotation ``{"image_id",
"file_name": <png>, "segments_info": [{"id", "category_id", "area", "bbox", "iscrowd"}]}``;
the PNG stores the segment id of each pixel as ``R + 256 G + 256^2 B`` (0 = void). The
categories carry ``isthing``.

Tables:
- ``instances``: the thing segments (``annotation_id`` = the segment id in its PNG,
  ``iscrowd`` kept), RLE from the PNG's pixels;
- ``stuff_segments``: the stuff segments, the same columns and ids;
- ``categories``: every category with ``isthing``.
``instance_id`` = ``image_id * 2**24 + segment id`` (segment ids are unique per image only and
below 2**24), so a row names its pixels.

Checks, under ``source.on_invalid`` (skip and count, or fail) like the other sources:
- image level (``images`` dropped): the PNG missing (``panoptic_png_missing``) or
  unreadable, a PNG of another size than its image (``panoptic_png_size``), duplicate
  segment ids in one annotation (``duplicate_segment_id``), an image without a panoptic
  annotation (``panoptic_annotation_missing``);
- segment level (``annotations`` dropped): an unknown category (``unknown_category``), a
  segment of the json absent from the PNG (``segment_missing_from_png``), a PNG segment id
  the json does not list (``segment_missing_from_json``: its pixels become void), a pixel
  count that differs from the json's ``area`` (``segment_area_mismatch``).
Structural damage (duplicate image or category ids, two annotations for one image, an
annotation of an unknown image) fails, as for COCO instances.
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from instseg_pipeline.data.masks import rgb_to_id
from instseg_pipeline.data.quality import IngestionError, QualityReport
from instseg_pipeline.data.sources import SourceTables
from instseg_pipeline.data.sources.checks import inspect_images, record_check
from instseg_pipeline.data.sources.coco import (
    _category_rows,
    _check_categories,
    _require_unique,
    _usable_images,
    _valid_records,
    load_json,
)
from instseg_pipeline.data.sources.mask_folder import instance_row
from instseg_pipeline.data.tables import make_categories, make_images, make_instances
from instseg_pipeline.progress import progress

if TYPE_CHECKING:
    import pandas as pd

    from instseg_pipeline.data.config import SourceConfig

logger = logging.getLogger(__name__)

SOURCE = "coco_panoptic"
SEGMENT_BITS = 24  # instance_id = image_id << 24 | segment id


def instance_id(image_id: int, segment_id: int) -> int:
    return (int(image_id) << SEGMENT_BITS) | int(segment_id)


def _annotations_by_image(data: dict, images: list[dict], path: Path) -> dict[int, dict]:
    """The panoptic annotation of each image id; structural problems fail."""
    known = {record["id"] for record in images}
    by_image: dict[int, dict] = {}
    for index, ann in enumerate(data.get("annotations", [])):
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        if not isinstance(ann, dict) or not isinstance(ann.get("segments_info"), list) \
                or not isinstance(ann.get("file_name"), str):
            raise IngestionError(f"{path}: annotations[{index}] is not a panoptic annotation "
                                 "(needs image_id, file_name and a segments_info list)")
        if image_id in by_image:
            raise IngestionError(f"{path}: image {image_id} has two panoptic annotations")
        if image_id not in known:
            raise IngestionError(f"{path}: annotations[{index}] refers to unknown image_id "
                                 f"{image_id}")
        by_image[image_id] = ann
    return by_image


def _read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _image_problem(record: dict, ann: dict | None, png: Path) -> tuple[str, str] | None:
    """``(reason, message)`` when the image's panoptic annotation cannot be used at all."""
    label = f"image {record['id']} ({record['file_name']})"
    if ann is None:
        return "panoptic_annotation_missing", f"{label}: no panoptic annotation"
    ids = Counter(s.get("id") for s in ann["segments_info"] if isinstance(s, dict))
    dupes = sorted(str(k) for k, n in ids.items() if n > 1)
    if dupes:
        return ("duplicate_segment_id",
                f"{label}: duplicate segment ids {', '.join(dupes)} in {png.name}")
    if not png.is_file():
        return "panoptic_png_missing", f"{label}: panoptic PNG {png} not found"
    return None


def _segment_rows(record: dict, ann: dict, ids: np.ndarray, categories: dict[int, bool],
                  png: Path, report: QualityReport) -> tuple[list[dict], list[dict]]:
    """Thing and stuff rows of one image; bad segments dropped and named."""
    values, counts = np.unique(ids, return_counts=True)
    areas = dict(zip(values.tolist(), counts.tolist()))
    areas.pop(0, None)
    listed = set()
    things, stuff = [], []
    for segment in ann["segments_info"]:
        sid, cat = segment.get("id"), segment.get("category_id")
        label = f"segment {sid} of image {record['id']} ({png})"
        listed.add(sid)
        if cat not in categories:
            report.drop("annotations", "unknown_category", f"{label}: unknown category_id {cat}")
        elif sid not in areas:
            report.drop("annotations", "segment_missing_from_png",
                        f"{label}: listed in the json, no pixel of the PNG has this id")
        elif segment.get("area") is not None and int(segment["area"]) != areas[sid]:
            report.drop("annotations", "segment_area_mismatch",
                        f"{label}: json area {segment['area']}, the PNG has {areas[sid]} pixels")
        else:
            row = instance_row(ids == sid, instance_id(record["id"], sid), record["id"], cat,
                               bool(segment.get("iscrowd", 0)))
            (things if categories[cat] else stuff).append({**row, "annotation_id": sid})
    for sid in sorted(set(areas) - listed):
        report.drop("annotations", "segment_missing_from_json",
                    f"segment {sid} of image {record['id']} ({png}): {areas[sid]} pixels in "
                    "the PNG, not listed in the json (read as void)")
    return things, stuff


def _load_ids(record: dict, png: Path) -> tuple[np.ndarray | None, tuple[str, str] | None]:
    """The PNG's int32 [H, W] segment ids, or why they cannot be used."""
    try:
        rgb = _read_png(png)
    except OSError as exc:
        return None, ("panoptic_png_unreadable", f"image {record['id']}: {png}: {exc}")
    if rgb.shape[:2] != (record["height"], record["width"]):
        message = (f"image {record['id']} ({record['file_name']}): panoptic PNG {png} is "
                   f"{rgb.shape[1]}x{rgb.shape[0]}, the image is "
                   f"{record['width']}x{record['height']}")
        return None, ("panoptic_png_size", message)
    return rgb_to_id(rgb), None


def _read_image(record: dict, ann: dict | None, mask_dir: Path, categories: dict[int, bool],
                report: QualityReport) -> tuple[list, list] | None:
    """Thing and stuff rows of one image, or None (dropped and counted)."""
    png = mask_dir / (ann["file_name"] if ann else Path(record["file_name"]).with_suffix(".png"))
    problem = _image_problem(record, ann, png)
    ids = None
    if problem is None:
        ids, problem = _load_ids(record, png)
    if problem is not None:
        report.drop("images", *problem)
        return None
    return _segment_rows(record, ann, ids, categories, png, report)


def load_panoptic(path: Path, report: QualityReport) -> tuple[dict, pd.DataFrame,
                                                               dict[int, dict]]:
    """The panoptic json at ``path`` (unusable image records dropped and counted), its
    ``categories`` table and each image id's annotation; structural damage fails."""
    data = load_json(path)
    data["images"] = _usable_images(data["images"], path, report)
    _check_categories(data.get("categories", []), path)
    for records, what in ((data["images"], "image"), (data.get("categories", []), "category")):
        _require_unique(records, what, path)
    by_image = _annotations_by_image(data, data["images"], path)
    return data, make_categories(_category_rows(data)), by_image


def read_segments(records: list[dict], by_image: dict[int, dict], mask_dir: Path,
                  categories: pd.DataFrame, report: QualityReport
                  ) -> tuple[list[dict], list[dict], list[dict]]:
    """The images' PNG segments as table rows: ``(kept records, thing rows, stuff rows)``.

    ``records``: image records with ``id``, ``file_name``, ``width``, ``height``;
    ``by_image`` and ``categories`` as `load_panoptic` returns them; PNGs under
    ``mask_dir``. An image whose PNG cannot be used is left out of the kept records, a
    segment that fails a check is left out of the rows (both counted in ``report``).
    """
    isthing = dict(zip(categories["category_id"].tolist(), categories["isthing"].tolist()))
    kept, things, stuff = [], [], []
    for record in progress(records, desc="panoptic", unit="img", logger=logger):
        rows = _read_image(record, by_image.get(record["id"]), mask_dir, isthing, report)
        if rows is not None:
            kept.append(record)
            things.extend(rows[0])
            stuff.extend(rows[1])
    return kept, things, stuff


def read(params: SourceConfig, report: QualityReport) -> SourceTables:
    """Read ``root/annotations`` (panoptic json), ``root/masks`` (its PNGs) and
    ``root/images`` into the tables (``stuff_segments`` included)."""
    root = Path(params.root)
    path = root / params.annotations
    data, categories, by_image = load_panoptic(path, report)
    records = _valid_records(data, root, params.images, report, params.max_image_pixels)
    checks = inspect_images([(r["path"], (r["width"], r["height"])) for r in records], params)
    records = [record for record, check in zip(records, checks)
               if record_check(check, report, label=f"image {record['id']}")]
    kept, things, stuff = read_segments(records, by_image, root / params.masks, categories,
                                        report)
    images = make_images({"image_id": r["id"], "file_name": r["relative"], "width": r["width"],
                          "height": r["height"], "split": params.split, "source": SOURCE}
                         for r in kept)
    logger.info("%s: %d images, %d thing and %d stuff segments kept", path, len(images),
                len(things), len(stuff))
    return SourceTables(images, make_instances(things), categories,
                        stuff_segments=make_instances(stuff))
