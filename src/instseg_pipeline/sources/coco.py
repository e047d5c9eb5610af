"""COCO instances json + image folder -> canonical tables.

Kept as in the file: image ids, annotation ids, (possibly non-contiguous) category ids,
images without annotations, crowd regions (flagged ``iscrowd``). Polygons (multi-part too),
uncompressed and compressed RLE all become one compressed RLE of the full image size.

Failing vs skipping (``on_invalid: skip`` counts and logs, ``fail`` raises):
- always fail: unreadable json, duplicate image / annotation / category ids, an annotation
  whose image_id or category_id is not declared — the file itself is inconsistent;
- skip or fail: an unusable image file (missing, empty, not an image, truncated, too many
  pixels, size different from the json) with all its annotations, and an unusable
  annotation (bad polygon, bad RLE, bad bbox, empty mask).
"""
from __future__ import annotations

import json
import logging
import math
from collections import Counter, defaultdict
from pathlib import Path

from pycocotools import mask as mask_utils
from tqdm.auto import tqdm

from instseg_pipeline import masks
from instseg_pipeline.quality import IngestionError, QualityReport
from instseg_pipeline.sources import SourceTables
from instseg_pipeline.sources.checks import inspect_images, record_check
from instseg_pipeline.tables import make_categories, make_images, make_instances

logger = logging.getLogger(__name__)


def load_json(path: Path) -> dict:
    """Parse a COCO json file, raising `IngestionError` that names the file."""
    if not path.is_file():
        raise IngestionError(f"{path}: annotation file not found")
    try:
        with path.open("rb") as handle:
            data = json.load(handle)
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


def _image_record_problem(record: dict) -> str | None:
    for key in ("width", "height"):
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            return f"{key} {value!r} is not a positive integer"
    if not isinstance(record.get("file_name"), str) or not record["file_name"]:
        return "file_name is missing"
    return None


def _bbox_problem(bbox) -> str | None:
    if bbox is None:
        return None
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return f"bbox {bbox!r} is not [x, y, w, h]"
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
               for v in bbox):
        return f"bbox {list(bbox)} has a non-finite value"
    if bbox[2] <= 0 or bbox[3] <= 0:
        return f"bbox {list(bbox)} has a non-positive width or height"
    return None


def _annotation_problem(ann: dict, height: int, width: int) -> tuple[str, str] | None:
    problem = _bbox_problem(ann.get("bbox"))
    if problem:
        return "bad_bbox", problem
    return masks.segmentation_problem(ann.get("segmentation"), height, width)


def convert_annotations(anns: list[dict], record: dict) -> tuple[list[dict], list[tuple]]:
    """``instances`` rows of one image's annotations, and ``(reason, message)`` problems."""
    height, width = record["height"], record["width"]
    usable, problems = [], []
    for ann in anns:
        problem = _annotation_problem(ann, height, width)
        if problem:
            problems.append((problem[0], (f"annotation {ann['id']} (image {ann['image_id']}, "
                                         f"{record['file_name']}): {problem[1]}")))
        else:
            usable.append(ann)
    rles = masks.segmentations_to_rles([a["segmentation"] for a in usable], height, width)
    areas = mask_utils.area(rles) if rles else []
    boxes = mask_utils.toBbox(rles) if rles else []
    rows = []
    for ann, rle, area, box in zip(usable, rles, areas, boxes):
        if area == 0:
            problems.append(("empty_mask", (f"annotation {ann['id']} (image {ann['image_id']}, "
                                           f"{record['file_name']}): covers no pixel")))
            continue
        rows.append({"instance_id": ann["id"], "image_id": ann["image_id"],
                     "category_id": ann["category_id"], "bbox": ann.get("bbox") or box,
                     "area": int(area), "iscrowd": bool(ann.get("iscrowd", 0)),
                     "rle": masks.rle_to_string(rle)})
    return rows, problems


def _valid_records(data: dict, root: Path, image_dir: str,
                   report: QualityReport) -> list[dict]:
    records = []
    for record in data["images"]:
        problem = _image_record_problem(record)
        if problem:
            report.drop("images", "bad_image_record", f"image {record.get('id')}: {problem}")
        else:
            relative = (Path(image_dir) / record["file_name"]).as_posix()
            records.append({**record, "relative": relative, "path": root / relative})
    return records


def _assemble(records: list[dict], image_checks, converted: dict, by_image: dict,
              report: QualityReport) -> tuple[list[dict], list[dict]]:
    """Apply image checks, then the kept images' annotation problems, in image order."""
    kept, rows = [], []
    for record, check in zip(records, image_checks):
        image_id = record["id"]
        if record_check(check, report, label=f"image {image_id}"):
            kept.append(record)
            image_rows, problems = converted.get(image_id, ([], []))
            for reason, message in problems:
                report.drop("annotations", reason, message)
            rows.extend(image_rows)
            continue
        for ann in by_image.get(image_id, []):
            report.drop("annotations", "image_dropped",
                        f"annotation {ann['id']}: its image {image_id} was dropped")
    return kept, rows


def read(params: dict, report: QualityReport) -> SourceTables:
    """Read ``root/annotations`` with images under ``root/images`` into the tables.

    params: root, annotations (json path relative to root), images (folder relative to
    root), split (optional split name given to every image; empty = split later),
    verify_images, max_image_pixels and workers (see `sources.checks`).
    """
    root = Path(params["root"])
    path = root / params["annotations"]
    data = load_json(path)
    for records, what in ((data["images"], "image"), (data.get("annotations", []), "annotation"),
                          (data.get("categories", []), "category")):
        _require_unique(records, what, path)
    _check_references(data, path)
    records = _valid_records(data, root, params.get("images", ""), report)
    image_checks = inspect_images([(r["path"], (r["width"], r["height"])) for r in records],
                                  params)
    by_image: dict[int, list[dict]] = defaultdict(list)
    for ann in data.get("annotations", []):
        by_image[ann["image_id"]].append(ann)
    # Annotations are converted while the image checks run; their problems are reported
    # afterwards, so the annotations of a dropped image count once, as image_dropped.
    converted = {r["id"]: convert_annotations(by_image[r["id"]], r)
                 for r in tqdm(records, desc="annotations", unit="img", disable=None,
                               leave=False) if r["id"] in by_image}
    checks = tqdm(image_checks, total=len(records), desc="images", unit="img", disable=None,
                  leave=False)
    kept, rows = _assemble(records, checks, converted, by_image, report)
    split = params.get("split") or ""
    images = make_images({"image_id": r["id"], "file_name": r["relative"],
                          "width": r["width"], "height": r["height"], "split": split,
                          "source": "coco"} for r in kept)
    logger.info("%s: %d images, %d annotations kept", path, len(images), len(rows))
    return SourceTables(images, make_instances(rows), make_categories(_category_rows(data)))
