"""COCO mask and box AP: the 12 standard numbers, per-class AP and the PR arrays.

Two backends give identical numbers: ``pycocotools`` (the reference) and
``faster-coco-eval`` (C++ matching and accumulation, several times faster). Both are fed
the same checked copies of the inputs, so neither can see a malformed result that the
other would reject, and neither can change the caller's ground truth in place.

Conventions (the ones papers use):
- crowd ground truth is "ignore": a detection matched to it is neither TP nor FP;
- a stat with nothing to measure (e.g. ``mAP_small`` with no small GT) is -1, as in COCO;
- segm results are sized by their mask area, never their box (a ``bbox`` on a segm result
  would make pycocotools size it by the box and move it between small/medium/large);
- an empty result list is valid: every stat with GT behind it is 0.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from instseg_pipeline.data.masks import segmentation_problem
from instseg_pipeline.evaluation import MetricInputError

logger = logging.getLogger(__name__)

STAT_NAMES = ("mAP", "mAP_50", "mAP_75", "mAP_small", "mAP_medium", "mAP_large",
              "AR_1", "AR_10", "AR_100", "AR_small", "AR_medium", "AR_large")
IOU_TYPES = ("segm", "bbox")
BACKENDS = ("pycocotools", "faster-coco-eval")
_MAX_LISTED = 20


# ---------------------------------------------------------------- public API

def coco_stats(gt, results, iou_type: str, backend: str = "faster-coco-eval") -> dict:
    """The 12 COCO stats (``STAT_NAMES`` -> float) of ``results`` against ``gt``.

    gt: a pycocotools ``COCO`` (anything with ``.dataset``) or a COCO instances dict.
    results: list of COCO result dicts (image_id, category_id, score, and bbox for
        ``bbox`` / segmentation for ``segm``), or a DataFrame with image_id, category_id,
        score and bbox and/or rle + height + width (compressed RLE string per row).
    """
    evaluator = _evaluate(gt, results, iou_type, backend)
    return _stats_dict(evaluator.stats)


def coco_eval_details(gt, results, iou_type: str, backend: str = "faster-coco-eval") -> dict:
    """The 12 stats plus per-class AP and the accumulated precision / recall arrays.

    Extra keys:
    - ``per_class_ap``: list of {category_id, name, ap}; ap is AP@[.5:.95] (area all,
      100 dets) or None where the category has no non-crowd GT;
    - ``precision``: float64 [T, R, K, A, M] (-1 where a category has no GT);
    - ``recall``: float64 [T, K, A, M];
    - ``iou_thresholds`` float64 [T], ``recall_thresholds`` float64 [R],
      ``category_ids`` list[int] (K), ``area_ranges`` list[str] (A), ``max_dets`` list[int] (M).
    """
    evaluator = _evaluate(gt, results, iou_type, backend)
    params = evaluator.params
    precision = np.asarray(evaluator.eval["precision"], dtype=np.float64)
    category_ids = [int(c) for c in params.catIds]
    names = {int(c["id"]): str(c.get("name", "")) for c in evaluator.cocoGt.dataset["categories"]}
    return {
        **_stats_dict(evaluator.stats),
        "per_class_ap": _per_class_ap(precision, category_ids, names),
        "precision": precision,
        "recall": np.asarray(evaluator.eval["recall"], dtype=np.float64),
        "iou_thresholds": np.asarray(params.iouThrs, dtype=np.float64),
        "recall_thresholds": np.asarray(params.recThrs, dtype=np.float64),
        "category_ids": category_ids,
        "area_ranges": list(params.areaRngLbl),
        "max_dets": [int(m) for m in params.maxDets],
    }


def evaluate_files(gt_path, results_path, iou_type: str,
                   backend: str = "faster-coco-eval") -> dict:
    """The 12 COCO stats of a results json against a GT json (the ``instseg-eval coco`` core).

    Raises `MetricInputError` naming the file when one is missing, is not JSON, or does not
    have the COCO structure (GT: dict with images / annotations / categories lists;
    results: list of objects).
    """
    gt = _read_json(gt_path, "ground-truth")
    results = _read_json(results_path, "results")
    evaluator = _evaluate(gt, results, iou_type, backend,
                          gt_name=f"ground-truth file {gt_path}",
                          results_name=f"results file {results_path}")
    return _stats_dict(evaluator.stats)


# ---------------------------------------------------------------- evaluation core

def _evaluate(gt, results, iou_type: str, backend: str,
              gt_name: str = "ground truth", results_name: str = "results"):
    """A summarized COCOeval of either backend on checked copies of the inputs."""
    _check_choice(iou_type, IOU_TYPES, "iou_type")
    _check_choice(backend, BACKENDS, "backend")
    dataset = _gt_dataset(gt, iou_type, gt_name)
    detections = _results_list(results, dataset, iou_type, results_name)
    run = _run_pycocotools if backend == "pycocotools" else _run_faster
    evaluator = run(dataset, detections, iou_type)
    logger.info("COCO %s (%s): %d images, %d GT, %d results, mAP=%.4f", iou_type, backend,
                len(dataset["images"]), len(dataset["annotations"]), len(detections),
                evaluator.stats[0])
    return evaluator


def _run_pycocotools(dataset: dict, detections: list[dict], iou_type: str):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with _library_output_to_log():
        coco_gt = COCO()
        coco_gt.dataset = dataset
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(detections) if detections else _empty_results(COCO, dataset)
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        _evaluate_accumulate_summarize(evaluator)
    return evaluator


def _run_faster(dataset: dict, detections: list[dict], iou_type: str):
    from faster_coco_eval import COCO, COCOeval_faster

    with _library_output_to_log():
        coco_gt = COCO(dataset, print_function=logger.debug)
        coco_dt = _faster_results(COCO, dataset, detections, iou_type)
        # Threads cost more CPU than they save on per-image IoUs this small (measured on
        # 500 images x 20 masks on 2 cores: +0.2 s CPU and slower wall time).
        evaluator = COCOeval_faster(coco_gt, coco_dt, iou_type, print_function=logger.debug,
                                    rle_iou_max_workers=1)
        _evaluate_accumulate_summarize(evaluator)
    return evaluator


def _faster_results(coco_class, dataset: dict, detections: list[dict], iou_type: str):
    """The results COCO that ``loadRes`` builds (ids 1..N, iscrowd 0, area of the mask or
    box), with all mask areas from one call: loadRes makes one per result, a quarter of
    the whole evaluation time."""
    areas = _result_areas(detections, iou_type)
    annotations = [{**detection, "id": index + 1, "iscrowd": 0, "area": float(area)}
                   for index, (detection, area) in enumerate(zip(detections, areas, strict=True))]
    results = coco_class(print_function=logger.debug)
    results.dataset = {"images": list(dataset["images"]), "annotations": annotations,
                       "categories": list(dataset["categories"])}
    results.createIndex()
    return results


def _result_areas(detections: list[dict], iou_type: str):
    if iou_type == "bbox":
        return [d["bbox"][2] * d["bbox"][3] for d in detections]
    if not detections:
        return []
    from faster_coco_eval.core import mask as faster_mask

    return faster_mask.area([d["segmentation"] for d in detections])


def _evaluate_accumulate_summarize(evaluator) -> None:
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()


def _empty_results(coco_class, dataset: dict):
    """A results COCO with no annotations: pycocotools' loadRes indexes ``anns[0]``."""
    empty = coco_class()
    empty.dataset = {"images": list(dataset["images"]), "annotations": [],
                     "categories": list(dataset["categories"])}
    empty.createIndex()
    return empty


@contextlib.contextmanager
def _library_output_to_log():
    """Capture what the COCO libraries print so a CLI's stdout stays pure JSON."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        yield
    for line in buffer.getvalue().splitlines():
        if line.strip():
            logger.debug("%s", line)


def _stats_dict(stats) -> dict:
    first = stats[:len(STAT_NAMES)]  # all_stats may hold more; stats is these 12 in both
    return {name: float(value) for name, value in zip(STAT_NAMES, first, strict=True)}


def _per_class_ap(precision: np.ndarray, category_ids: list[int], names: dict) -> list[dict]:
    """AP@[.5:.95] per category from precision [T, R, K, A, M] (area all, most dets)."""
    rows = []
    for k, category_id in enumerate(category_ids):
        curve = precision[:, :, k, 0, -1]
        valid = curve[curve > -1]
        ap = float(np.mean(valid)) if valid.size else None
        rows.append({"category_id": category_id, "name": names.get(category_id, ""), "ap": ap})
    return rows


def _check_choice(value: str, allowed: tuple, what: str) -> None:
    if value not in allowed:
        raise MetricInputError(f"{what} {value!r} is not one of {', '.join(allowed)}")


# ---------------------------------------------------------------- files

def _read_json(path, what: str):
    path = Path(path)
    if not path.is_file():
        state = "is a directory" if path.is_dir() else "does not exist"
        raise MetricInputError(f"{what} file {path} {state}")
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MetricInputError(f"{what} file {path} is not valid JSON: {exc}") from exc


# ---------------------------------------------------------------- ground truth

def _gt_dataset(gt, iou_type: str, name: str) -> dict:
    """A checked copy of the GT dict; annotations are fresh dicts with ids 1..N.

    The libraries write into annotation dicts (``ignore``, RLE in place of polygons), hence
    the copies. Ids are renumbered because both treat a GT id of 0 as "unmatched" and
    duplicates collide in their indexes; the numbers do not depend on ids otherwise.
    """
    dataset = gt.dataset if hasattr(gt, "dataset") else gt
    _check_gt_structure(dataset, name)
    sizes = _image_sizes(dataset["images"], name)
    category_ids = _category_ids(dataset["categories"], name)
    annotations = []
    for index, ann in enumerate(dataset["annotations"]):
        try:  # a try block costs nothing until it raises, unlike a context manager
            annotations.append(_gt_annotation(ann, index, sizes, category_ids, iou_type))
        except MetricInputError as exc:
            raise _located(exc, f"{name}: annotation", ann, index) from None
    return {"images": [dict(image) for image in dataset["images"]],
            "annotations": annotations,
            "categories": [dict(category) for category in dataset["categories"]]}


def _located(exc: MetricInputError, prefix: str, item, index: int) -> MetricInputError:
    """The check's error with where it happened in front (item id, else its index)."""
    ident = item.get("id", index) if isinstance(item, dict) else index
    return MetricInputError(f"{prefix} {ident}: {exc}")


def _check_gt_structure(dataset, name: str) -> None:
    if not isinstance(dataset, dict):
        raise MetricInputError(f"{name}: expected a COCO dict with images, annotations and "
                               f"categories, got {type(dataset).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(dataset.get(key), list):
            raise MetricInputError(f"{name}: '{key}' is missing or not a list")


def _image_sizes(images: list, name: str) -> dict[int, tuple[int, int]]:
    sizes: dict[int, tuple[int, int]] = {}
    for index, image in enumerate(images):
        try:
            _require(image, ("id", "height", "width"))
            image_id = _as_int(image["id"], "id")
            if image_id in sizes:
                raise MetricInputError("appears twice")
            sizes[image_id] = (_as_int(image["height"], "height"),
                               _as_int(image["width"], "width"))
        except MetricInputError as exc:
            raise _located(exc, f"{name}: image", image, index) from None
    return sizes


def _category_ids(categories: list, name: str) -> set[int]:
    ids = set()
    for index, category in enumerate(categories):
        try:
            _require(category, ("id",))
            ids.add(_as_int(category["id"], "id"))
        except MetricInputError as exc:
            raise _located(exc, f"{name}: category", category, index) from None
    return ids


_GT_KEYS = {"bbox": ("image_id", "category_id", "bbox", "area"),
            "segm": ("image_id", "category_id", "segmentation", "area")}


def _gt_annotation(ann, index: int, sizes: dict, category_ids: set, iou_type: str) -> dict:
    _require(ann, _GT_KEYS[iou_type])
    image_id = _as_int(ann["image_id"], "image_id")
    if image_id not in sizes:
        raise MetricInputError(f"refers to image id {image_id}, not in images")
    if _as_int(ann["category_id"], "category_id") not in category_ids:
        raise MetricInputError(f"has category id {ann['category_id']}, not in categories")
    _finite(ann["area"], "area")
    if iou_type == "segm":
        _check_gt_segmentation(ann["segmentation"], sizes[image_id])
    else:
        _check_box(ann["bbox"])
    return {**ann, "id": index + 1, "image_id": image_id, "iscrowd": int(ann.get("iscrowd", 0))}


def _check_gt_segmentation(segmentation, size: tuple[int, int]) -> None:
    """Reject what would crash pycocotools or decode garbage.

    Compressed strings only get a size check: decoding each in Python would cost more
    than the whole evaluation, and the RLE decoders stop at the declared size.
    """
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), (str, bytes)):
        problem = _rle_size_problem(segmentation, size)
    else:
        problem = segmentation_problem(segmentation, *size)
    if problem:
        raise MetricInputError(problem)


def _rle_size_problem(rle: dict, size: tuple[int, int]) -> str | None:
    declared = rle.get("size")
    if not (isinstance(declared, (list, tuple)) and len(declared) == 2):
        return f"RLE size {declared!r} is not [height, width]"
    if (int(declared[0]), int(declared[1])) != size:
        return f"RLE size {list(declared)} differs from the image size {list(size)}"
    return None


# ---------------------------------------------------------------- results

def _results_list(results, dataset: dict, iou_type: str, name: str) -> list[dict]:
    """Checked result dicts holding only what ``iou_type`` needs (fresh copies)."""
    if hasattr(results, "columns"):
        results = _frame_to_results(results, iou_type, name)
    if not isinstance(results, list):
        raise MetricInputError(f"{name}: expected a list of result objects, "
                               f"got {type(results).__name__}")
    sizes = {int(image["id"]): (int(image["height"]), int(image["width"]))
             for image in dataset["images"]}
    detections = []
    for index, result in enumerate(results):
        try:
            detections.append(_detection(result, sizes, iou_type))
        except MetricInputError as exc:
            raise _located(exc, f"{name}: result", None, index) from None
    _check_ids(detections, sizes, {int(c["id"]) for c in dataset["categories"]}, name)
    return detections


def _detection(result, sizes: dict, iou_type: str) -> dict:
    _require(result, ("image_id", "category_id", "score"))
    detection = {"image_id": _as_int(result["image_id"], "image_id"),
                 "category_id": _as_int(result["category_id"], "category_id"),
                 "score": _finite(result["score"], "score")}
    size = sizes.get(detection["image_id"])
    if size is None:  # unknown image ids are reported all together afterwards
        return detection
    if iou_type == "bbox":
        detection["bbox"] = _result_box(result, size)
    else:
        detection["segmentation"] = _result_rle(result, size)
    return detection


def _result_box(result: dict, size: tuple[int, int]) -> list[float]:
    if "bbox" in result:
        return _check_box(result["bbox"])
    if "segmentation" in result:
        return [float(v) for v in mask_utils.toBbox(_result_rle(result, size))]
    raise MetricInputError("has neither bbox nor segmentation")


def _check_box(box) -> list[float]:
    if not isinstance(box, (list, tuple, np.ndarray)) or len(box) != 4:
        raise MetricInputError(f"bbox {box!r} is not [x, y, w, h]")
    return [_finite(value, "bbox") for value in box]


def _result_rle(result: dict, size: tuple[int, int]) -> dict:
    """Compressed RLE of a result's segmentation (polygons and list counts converted)."""
    segmentation = result.get("segmentation")
    if segmentation is None:
        raise MetricInputError("has no segmentation (needed for segm)")
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), (str, bytes)):
        problem = _rle_size_problem(segmentation, size)
        if problem:
            raise MetricInputError(problem)
        return {"size": [size[0], size[1]], "counts": segmentation["counts"]}
    problem = segmentation_problem(segmentation, *size)
    if problem:
        raise MetricInputError(problem)
    return _to_compressed(segmentation, size)


def _to_compressed(segmentation, size: tuple[int, int]) -> dict:
    height, width = size
    if isinstance(segmentation, dict):
        return mask_utils.frPyObjects(segmentation, height, width)
    return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))


def _check_ids(detections: list[dict], sizes: dict, category_ids: set, name: str) -> None:
    unknown_images = sorted({d["image_id"] for d in detections} - sizes.keys())
    if unknown_images:
        raise MetricInputError(f"{name}: {len(unknown_images)} image id(s) not in the ground "
                               f"truth: {_listing(unknown_images)}")
    unknown_categories = sorted({d["category_id"] for d in detections} - category_ids)
    if unknown_categories:
        raise MetricInputError(f"{name}: category id(s) not in the ground truth: "
                               f"{_listing(unknown_categories)}")


def _frame_to_results(frame, iou_type: str, name: str) -> list[dict]:
    """Result dicts of a predictions DataFrame (bbox and/or rle + height + width)."""
    needed = ["image_id", "category_id", "score"]
    has_rle = all(c in frame.columns for c in ("rle", "height", "width"))
    if iou_type == "segm" and not has_rle:
        needed += ["rle", "height", "width"]
    if iou_type == "bbox" and "bbox" not in frame.columns and not has_rle:
        needed += ["bbox"]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise MetricInputError(f"{name}: predictions table lacks column(s) {', '.join(missing)}")
    rows = frame.to_dict("records")
    return [_row_to_result(row, iou_type, has_rle) for row in rows]


def _row_to_result(row: dict, iou_type: str, has_rle: bool) -> dict:
    result = {"image_id": row["image_id"], "category_id": row["category_id"],
              "score": row["score"]}
    if iou_type == "bbox" and "bbox" in row:
        result["bbox"] = row["bbox"]
    elif has_rle:
        result["segmentation"] = {"size": [int(row["height"]), int(row["width"])],
                                  "counts": row["rle"]}
    return result


# ---------------------------------------------------------------- small checks
# These raise messages without a location; `_located` adds it.

def _require(item, keys: tuple) -> None:
    if not isinstance(item, dict):
        raise MetricInputError(f"is a {type(item).__name__}, not an object")
    missing = [key for key in keys if key not in item]
    if missing:
        raise MetricInputError(f"lacks {', '.join(missing)}")


def _as_int(value, what: str) -> int:
    if type(value) is int:  # the common case, checked first: this runs per annotation
        return value
    integral = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    whole_float = isinstance(value, (float, np.floating)) and float(value).is_integer()
    if not (integral or whole_float):
        raise MetricInputError(f"{what} {value!r} is not an integer id")
    return int(value)


def _finite(value, what: str) -> float:
    if type(value) is float and math.isfinite(value):
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise MetricInputError(f"{what} {value!r} is not a number")
    if not math.isfinite(float(value)):
        raise MetricInputError(f"{what} {value!r} is not finite")
    return float(value)


def _listing(ids: list[int]) -> str:
    shown = ", ".join(str(i) for i in ids[:_MAX_LISTED])
    return shown + (f", ... ({len(ids) - _MAX_LISTED} more)" if len(ids) > _MAX_LISTED else "")
