"""COCO instances json + image folder -> canonical tables.

Kept as in the file: image ids, annotation ids, (possibly non-contiguous) category ids,
images without annotations, crowd regions (flagged ``iscrowd``). Polygons (multi-part too),
uncompressed and compressed RLE all become one compressed RLE of the full image size.

Box-only annotations (a ``bbox`` and no, null or empty ``segmentation``: detection data)
are read when ``source.pseudo_masks.method`` is set: after the image check, the kept images'
boxes get pseudo-masks (`data.pseudo_masks`, in worker processes, with a progress bar),
``mask_source`` says which (the method, or ``box`` after a fallback; ``annotated`` for drawn
masks); a box partly outside the image is clipped to it, and a crowd box-only region is its
filled box. Their counts land in the quality report's notes (``pseudo_masks_<source>``,
``pseudo_mask_fallback_<reason>``).

Failing vs skipping (``on_invalid: skip`` counts and logs, ``fail`` raises):
- always fail: unreadable json, duplicate image / annotation / category ids, an annotation
  whose image_id or category_id is not declared — the file itself is inconsistent; a
  box-only annotation while ``source.pseudo_masks`` is not set (named with the fix);
- skip or fail: an image record that is not an object or has no integer id
  (``bad_image_record``, named by its position ``images[i]``), or whose declared size is
  not positive or exceeds ``max_image_pixels`` (``too_many_pixels``, before any of its
  annotations is converted); an unusable image file (missing, empty, not an image,
  truncated, too many pixels, size different from the json) with all its annotations; an
  annotation record that is not an object or has a non-integer id / image_id / category_id
  (``bad_annotation_record``); and an unusable annotation (bad or far-out polygon, RLE or
  bbox, absurd vertex or run counts, empty mask: reason codes and limits in `data.masks`);
  a box-only annotation whose box has no area (``zero_area_box``) or nothing inside the
  image (``box_outside_image``).
- a category that is not an object or has no integer id fails the file.

Memory. Every geometry is checked against limits derived from its image's declared size
before pycocotools allocates anything for it, and that size is capped by
``max_image_pixels``. With F the json size in bytes, H x W the largest size declared by an
image record that passes that cap, and O the total length of the kept masks' RLE strings
(the output column), a read adds at most `memory_bound` =
32 MiB + 64*F + 256*(H+2)*(W+2) + 4*O bytes to the resident size the process had before:

- 64*F: the raw bytes, and the parsed json as Python objects (at most ~32 bytes per byte
  of json, reached by nested empty containers; numbers cost 4-8), with the image records
  copied once more with their paths;
- 256*(H+2)*(W+2): one segmentation's rasterisation (pycocotools: 20 bytes per boundary
  sample, at most 12*(H+2)*(W+2) samples, then 4*(H*W+1) to merge parts), or one decoded
  image during the check, whichever is larger; never both at once;
- 4*O: the kept RLE strings as Python strings and then as the table's column; O itself is
  at most 6*(H*W+1) characters per kept instance;
- 32 MiB: fixed buffers (one block of a compressed string being decoded, pandas).

Image-check worker processes (``workers``) each hold one decoded image besides their copy
of the parent. Pseudo-mask workers (``pseudo_masks.workers``, after the image check) hold
one decoded image, one full-size mask and GrabCut's working copy of one box's crop (at
most the image), well within the 256*(H+2)*(W+2) term; a pseudo-mask's RLE counts in O
like any kept mask. The ``sam`` method adds its model, outside this bound.
tests/data/test_coco_memory.py measures VmHWM against this bound.
"""
from __future__ import annotations

import gc
import json
import logging
import math
from collections import Counter, defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import orjson
from pycocotools import mask as mask_utils

from instseg_pipeline.data import masks
from instseg_pipeline.data.pseudo_masks import box_pixels, generate
from instseg_pipeline.data.quality import IngestionError, QualityReport
from instseg_pipeline.data.sources import SourceTables
from instseg_pipeline.data.sources.checks import inspect_images, record_check
from instseg_pipeline.data.tables import (
    ANNOTATED,
    instances_from_columns,
    make_categories,
    make_images,
)
from instseg_pipeline.progress import progress

if TYPE_CHECKING:
    from instseg_pipeline.data.config import SourceConfig
    from instseg_pipeline.data.pseudo_masks import PseudoMaskConfig

logger = logging.getLogger(__name__)

MEMORY_FIXED_BYTES = 32 << 20


def memory_bound(file_bytes: int, height: int, width: int, rle_chars: int) -> int:
    """Bytes a read may add to the process's resident size (module docstring): a json of
    ``file_bytes``, largest kept image ``height`` x ``width``, ``rle_chars`` of output RLE."""
    return (MEMORY_FIXED_BYTES + 64 * file_bytes + 256 * (height + 2) * (width + 2)
            + 4 * rle_chars)


def load_json(path: Path) -> dict:
    """Parse a COCO json file, raising `IngestionError` that names the file."""
    if not path.is_file():
        raise IngestionError(f"{path}: annotation file not found")
    raw = path.read_bytes()
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        # strict JSON failed; the json module also reads NaN / Infinity (which json.dumps
        # writes) so that such coordinates are reported per annotation, not per file
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise IngestionError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise IngestionError(f"{path}: not a COCO instances file (no 'images' list)")
    for key in ("annotations", "categories"):
        if not isinstance(data.get(key, []), list):
            raise IngestionError(f"{path}: '{key}' must be a list")
    return data


def _require_unique(records: list[dict], what: str, path: Path) -> None:
    counts = Counter(r.get("id") for r in records)
    dupes = sorted(str(k) for k, n in counts.items() if n > 1)
    if dupes:
        raise IngestionError(f"{path}: duplicate {what} ids {', '.join(dupes[:10])}")


def _check_references(data: dict, path: Path) -> None:
    image_ids = {im.get("id") for im in data["images"]}
    category_ids = {c.get("id") for c in data.get("categories", [])}
    for ann in data.get("annotations", []):
        if ann.get("image_id") not in image_ids:
            raise IngestionError(f"{path}: annotation {ann.get('id')} refers to unknown "
                                 f"image_id {ann.get('image_id')}")
        if ann.get("category_id") not in category_ids:
            raise IngestionError(f"{path}: annotation {ann.get('id')} refers to unknown "
                                 f"category_id {ann.get('category_id')}")


def _category_rows(data: dict) -> list[dict]:
    return [{"category_id": c["id"], "name": str(c.get("name", c["id"])),
             "supercategory": str(c.get("supercategory") or ""),
             "isthing": bool(c.get("isthing", True))} for c in data.get("categories", [])]


def _is_id(value) -> bool:
    """An id the int64 tables can hold: an int (not a bool) in the int64 range."""
    return type(value) is int and -2**63 <= value < 2**63


def _usable_images(records: list, path: Path, report: QualityReport) -> list[dict]:
    """Image records that are objects with an integer id; the others are dropped
    (``bad_image_record``), named by their position in the file."""
    usable = []
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            report.drop("images", "bad_image_record",
                        f"images[{index}] of {path}: not an object ({type(record).__name__})")
        elif not _is_id(record.get("id")):
            report.drop("images", "bad_image_record",
                        f"images[{index}] of {path}: id {record.get('id')!r} is not an integer")
        else:
            usable.append(record)
    return usable


def _annotation_record_problem(ann) -> str | None:
    if not isinstance(ann, dict):
        return f"not an object ({type(ann).__name__})"
    for key in ("id", "image_id", "category_id"):
        if not _is_id(ann.get(key)):
            return f"{key} {ann.get(key)!r} is not an integer"
    return None


def _usable_annotations(records: list, path: Path, report: QualityReport) -> list[dict]:
    """Annotation records that are objects with integer id, image_id and category_id; the
    others are dropped (``bad_annotation_record``), named by id or position."""
    usable = []
    for index, ann in enumerate(records):
        problem = _annotation_record_problem(ann)
        if problem is None:
            usable.append(ann)
            continue
        label = (f"annotation {ann['id']}" if isinstance(ann, dict) and _is_id(ann.get("id"))
                 else f"annotations[{index}]")
        report.drop("annotations", "bad_annotation_record", f"{label} of {path}: {problem}")
    return usable


def _check_categories(records: list, path: Path) -> None:
    """Categories are few and referenced by every annotation: a malformed one fails."""
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise IngestionError(f"{path}: categories[{index}] is not an object "
                                 f"({type(record).__name__})")
        if not _is_id(record.get("id")):
            raise IngestionError(f"{path}: categories[{index}]: id {record.get('id')!r} is "
                                 f"not an integer")


def _image_record_problem(record: dict) -> str | None:
    for key in ("width", "height"):
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            return f"{key} {value!r} is not a positive integer"
    if not isinstance(record.get("file_name"), str) or not record["file_name"]:
        return "file_name is missing"
    return None


def _finite_number(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond the float range
        return False


def _bbox_problem(bbox, height: int, width: int) -> tuple[str, str] | None:
    """``(reason, message)`` for a bbox that is malformed (``bad_bbox``) or lies more than
    one image size outside the image (``bbox_out_of_bounds``, as for polygons)."""
    if bbox is None:
        return None
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return "bad_bbox", f"bbox {bbox!r} is not [x, y, w, h]"
    if not all(_finite_number(v) for v in bbox):
        return "bad_bbox", f"bbox {list(bbox)} has a non-finite value"
    if bbox[2] <= 0 or bbox[3] <= 0:
        return "bad_bbox", f"bbox {list(bbox)} has a non-positive width or height"
    x, y, w, h = bbox
    if not masks.within_margin(x, x + w, y, y + h, height, width):
        return ("bbox_out_of_bounds",
                (f"bbox {list(bbox)} reaches more than one image size outside the "
                f"{width}x{height} image"))
    return None


def _plain_bbox(bbox, height: int, width: int) -> bool:
    """True for a missing bbox or four finite numbers with positive width and height
    inside the margin box (a fast path: False means "look closer", not "bad")."""
    if bbox is None:
        return True
    if type(bbox) is not list or len(bbox) != 4:
        return False
    try:
        x, y, w, h = bbox
        return math.isfinite(sum(bbox, 0.0)) and w > 0 and h > 0 and \
            not any(type(v) is bool for v in bbox) and \
            masks.within_margin(x, x + w, y, y + h, height, width)
    except (TypeError, OverflowError):
        return False


def _annotation_problem(ann: dict, height: int, width: int) -> tuple[str, str] | None:
    segmentation, bbox = ann.get("segmentation"), ann.get("bbox")
    if _plain_bbox(bbox, height, width) and masks.plain_polygon(segmentation, height, width):
        return None
    return _bbox_problem(bbox, height, width) or \
        masks.segmentation_problem(segmentation, height, width)


INSTANCE_FIELDS = ("instance_id", "image_id", "category_id", "bbox", "area", "iscrowd", "rle",
                   "mask_source")


def is_box_only(ann: dict) -> bool:
    """A detection annotation: a ``bbox`` and no, null or empty ``segmentation``."""
    segmentation = ann.get("segmentation")
    return (segmentation is None or segmentation == []) and ann.get("bbox") is not None


def _require_pseudo_masks(annotations: list[dict], path: Path) -> None:
    """Box-only annotations need ``source.pseudo_masks.method``: fail naming the first."""
    box_only = [ann for ann in annotations if is_box_only(ann)]
    if box_only:
        first = box_only[0]
        raise IngestionError(
            f"{path}: annotation {first['id']} (image {first['image_id']}) has a bbox but no "
            f"segmentation ({len(box_only)} such box-only annotations in the file); to make "
            f"their masks from the boxes set source.pseudo_masks.method: box | grabcut | sam")


def _box_only_problem(bbox, height: int, width: int) -> tuple[str, str] | None:
    """``(reason, message)`` for the box of a box-only annotation that cannot make a mask:
    `_bbox_problem`'s, with a box of no width or height as ``zero_area_box``."""
    problem = _bbox_problem(bbox, height, width) if bbox is not None else \
        ("bad_bbox", f"bbox {bbox!r} is not [x, y, w, h]")
    if problem and problem[0] == "bad_bbox" and "non-positive" in problem[1]:
        return "zero_area_box", f"bbox {list(bbox)} of a box-only annotation has no area"
    if problem:
        return problem
    if box_pixels(bbox, height, width) is None:
        return ("box_outside_image",
                (f"bbox {list(bbox)} of a box-only annotation lies outside the "
                 f"{width}x{height} image"))
    return None


def _clipped_box(bbox, height: int, width: int) -> list[float]:
    x, y, w, h = (float(v) for v in bbox)
    x0, y0 = max(x, 0.0), max(y, 0.0)
    return [x0, y0, min(x + w, float(width)) - x0, min(y + h, float(height)) - y0]


def _filled_box_rle(bbox: list[float], height: int, width: int) -> tuple[str, int]:
    x0, y0, x1, y1 = box_pixels(bbox, height, width)
    bitmap = np.zeros((height, width), dtype=np.uint8)
    bitmap[y0:y1, x0:x1] = 1
    return masks.rle_to_string(masks.bitmap_to_rle(bitmap)), (y1 - y0) * (x1 - x0)


def _box_only_columns(anns: list[dict], record: dict, method: str,
                      problems: list[tuple]) -> dict:
    """Columns of box-only annotations: boxes clipped to the image, ``rle`` None until
    `_add_pseudo_masks` (a crowd region: its filled box now)."""
    height, width = record["height"], record["width"]
    columns: dict[str, list] = {name: [] for name in INSTANCE_FIELDS}
    for ann in anns:
        problem = _box_only_problem(ann["bbox"], height, width)
        if problem:
            problems.append((problem[0], (f"annotation {ann['id']} (image {ann['image_id']}, "
                                         f"{record['file_name']}): {problem[1]}")))
            continue
        box = _clipped_box(ann["bbox"], height, width)
        crowd = bool(ann.get("iscrowd", 0))
        rle, area = _filled_box_rle(box, height, width) if crowd else (None, 0)
        for name, value in (("instance_id", ann["id"]), ("category_id", ann["category_id"]),
                            ("bbox", box), ("area", area), ("iscrowd", crowd), ("rle", rle),
                            ("mask_source", "box" if crowd else method)):
            columns[name].append(value)
    return columns


def convert_annotations(anns: list[dict], record: dict,
                        pseudo_masks: PseudoMaskConfig | None = None
                        ) -> tuple[dict, list[tuple]]:
    """``instances`` columns (``{column: list}``) of one image's annotations, and
    ``(reason, message)`` problems.

    With ``pseudo_masks``, box-only annotations (`is_box_only`) come last, their ``rle``
    None until `_add_pseudo_masks` (``mask_source``: the method); without it they are
    checked as any segmentation.
    """
    height, width = record["height"], record["width"]
    usable, problems, box_only = [], [], []
    for ann in anns:
        if pseudo_masks is not None and is_box_only(ann):
            box_only.append(ann)
            continue
        problem = _annotation_problem(ann, height, width)
        if problem:
            problems.append((problem[0], (f"annotation {ann['id']} (image {ann['image_id']}, "
                                         f"{record['file_name']}): {problem[1]}")))
        else:
            usable.append(ann)
    rles = masks.segmentations_to_rles([a["segmentation"] for a in usable], height, width)
    areas = mask_utils.area(rles).tolist() if rles else []
    boxes = mask_utils.toBbox(rles).tolist() if rles else []
    columns: dict[str, list] = {name: [] for name in INSTANCE_FIELDS}
    for ann, rle, area, box in zip(usable, rles, areas, boxes):
        if area == 0:
            problems.append(("empty_mask", (f"annotation {ann['id']} (image {ann['image_id']}, "
                                           f"{record['file_name']}): covers no pixel")))
            continue
        columns["instance_id"].append(ann["id"])
        columns["category_id"].append(ann["category_id"])
        columns["bbox"].append(ann.get("bbox") or box)
        columns["area"].append(area)
        columns["iscrowd"].append(bool(ann.get("iscrowd", 0)))
        columns["rle"].append(rle["counts"])
    columns["rle"] = [c.decode("ascii") if type(c) is bytes else c for c in columns["rle"]]
    columns["mask_source"] = [ANNOTATED] * len(columns["instance_id"])
    if box_only:
        for name, values in _box_only_columns(box_only, record, pseudo_masks.method,
                                              problems).items():
            columns[name].extend(values)
    columns["image_id"] = [record["id"]] * len(columns["instance_id"])
    return columns, problems


def _add_pseudo_masks(columns: dict, kept: list[dict], config: PseudoMaskConfig,
                      report: QualityReport) -> None:
    """Fill the ``rle`` / ``area`` / ``mask_source`` of the box-only rows (``rle`` None)
    with pseudo-masks of the kept images, counting them in ``report``'s notes."""
    pending = [i for i, rle in enumerate(columns["rle"]) if rle is None]
    if not pending:
        return
    rows: dict[int, list[int]] = defaultdict(list)
    for i in pending:
        rows[columns["image_id"][i]].append(i)
    records = {record["id"]: record for record in kept}
    jobs = [(records[image_id]["path"], [columns["bbox"][i] for i in indices],
             (records[image_id]["width"], records[image_id]["height"]))
            for image_id, indices in rows.items()]
    results, counts = generate(jobs, config)
    for indices, result in zip(rows.values(), results):
        for i, rle, area, source in zip(indices, result.rles, result.areas, result.sources):
            columns["rle"][i], columns["area"][i], columns["mask_source"][i] = rle, area, source
    for source, count in counts["sources"].items():
        report.note(f"pseudo_masks_{source}", count)
    for reason, count in counts["fallbacks"].items():
        report.note(f"pseudo_mask_fallback_{reason}", count)


def _valid_records(data: dict, root: Path, image_dir: str, report: QualityReport,
                   max_pixels: int) -> list[dict]:
    """Image records with a usable size and file name, at most ``max_pixels`` pixels:
    every geometry limit derives from the declared size, so a larger one is dropped
    before any of its annotations is converted (its file would be refused anyway)."""
    records = []
    for record in data["images"]:
        problem = _image_record_problem(record)
        if problem:
            report.drop("images", "bad_image_record", f"image {record.get('id')}: {problem}")
        elif record["width"] * record["height"] > max_pixels:
            report.drop("images", "too_many_pixels",
                        f"image {record['id']} ({record['file_name']}): declared "
                        f"{record['width']}x{record['height']} = "
                        f"{record['width'] * record['height']} pixels, over "
                        f"source.max_image_pixels = {max_pixels}")
        else:
            relative = (Path(image_dir) / record["file_name"]).as_posix()
            records.append({**record, "relative": relative, "path": root / relative})
    return records


def _assemble(records: list[dict], image_checks, converted: dict, ann_ids: dict,
              report: QualityReport) -> tuple[list[dict], dict]:
    """Apply image checks, then the kept images' annotation problems, in image order.

    ``ann_ids``: annotation ids per image id (those of a dropped image are reported)."""
    kept, columns = [], {name: [] for name in INSTANCE_FIELDS}
    for record, check in zip(records, image_checks):
        image_id = record["id"]
        if record_check(check, report, label=f"image {image_id}"):
            kept.append(record)
            if image_id in converted:
                image_columns, problems = converted[image_id]
                for reason, message in problems:
                    report.drop("annotations", reason, message)
                for name, values in image_columns.items():
                    columns[name].extend(values)
            continue
        for ann_id in ann_ids.get(image_id, []):
            report.drop("annotations", "image_dropped",
                        f"annotation {ann_id}: its image {image_id} was dropped")
    return kept, columns


@contextmanager
def _collector_paused():
    """Pause the cyclic garbage collector: the parsed json is a large graph of containers
    that each collection would walk again while conversion allocates (nothing here makes
    reference cycles); it runs again, and catches up, on exit."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def read(params: SourceConfig, report: QualityReport) -> SourceTables:
    """Read ``root/annotations`` with images under ``root/images`` into the tables.

    params: root, annotations (json path relative to root), images (folder relative to
    root), split (optional split name given to every image; empty = split later),
    verify_images, max_image_pixels and workers (see `sources.checks`).
    """
    with _collector_paused():
        return _read(params, report)


def _read(params: SourceConfig, report: QualityReport) -> SourceTables:
    root = Path(params.root)
    path = root / params.annotations
    data = load_json(path)
    # Records that are not objects or lack integer ids go first, so that the structural
    # checks below (duplicates, references) compare only well-typed ids.
    data["images"] = _usable_images(data["images"], path, report)
    data["annotations"] = _usable_annotations(data.get("annotations", []), path, report)
    _check_categories(data.get("categories", []), path)
    for records, what in ((data["images"], "image"), (data.get("annotations", []), "annotation"),
                          (data.get("categories", []), "category")):
        _require_unique(records, what, path)
    _check_references(data, path)
    if params.pseudo_masks is None:
        _require_pseudo_masks(data.get("annotations", []), path)
    records = _valid_records(data, root, params.images, report, params.max_image_pixels)
    image_checks = inspect_images([(r["path"], (r["width"], r["height"])) for r in records],
                                  params)
    # Each image's annotations are converted while the image checks run, and then let go,
    # so that the memory of the parsed polygons is reused for the tables as they grow.
    by_image: dict[int, list[dict]] = defaultdict(list)
    for ann in data.pop("annotations", []):
        by_image[ann["image_id"]].append(ann)
    categories = make_categories(_category_rows(data))
    data.clear()
    converted, ann_ids = {}, {}
    for record in progress(records, desc="annotations", unit="img", leave=False, logger=logger):
        anns = by_image.pop(record["id"], None)
        if anns:
            ann_ids[record["id"]] = [ann["id"] for ann in anns]
            converted[record["id"]] = convert_annotations(anns, record, params.pseudo_masks)
    for image_id, anns in by_image.items():  # left: those of unusable image records
        for ann in anns:
            report.drop("annotations", "image_dropped",
                        f"annotation {ann['id']}: its image {image_id} was dropped")
    del by_image
    checks = progress(image_checks, total=len(records), desc="images", unit="img",
                      leave=False, logger=logger)
    kept, columns = _assemble(records, checks, converted, ann_ids, report)
    del converted
    if params.pseudo_masks is not None:
        _add_pseudo_masks(columns, kept, params.pseudo_masks, report)
    split = params.split
    images = make_images({"image_id": r["id"], "file_name": r["relative"],
                          "width": r["width"], "height": r["height"], "split": split,
                          "source": "coco"} for r in kept)
    logger.info("%s: %d images, %d annotations kept", path, len(images),
                len(columns["instance_id"]))
    return SourceTables(images, instances_from_columns(columns), categories)
