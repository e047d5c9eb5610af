"""Panoptic quality (PQ, SQ, RQ) with the COCO panoptic task's rules.

An image's segments live in an id map (integer [H, W], 0 = void) described by a
``segments_info`` list of ``{"id", "category_id", "iscrowd"}`` dicts: the COCO panoptic
format, whose PNGs store ``id = R + 256 * G + 256**2 * B``. Rules, per image:

- a prediction matches a ground-truth (GT) segment of the same category when IoU > 0.5,
  where the union leaves out the prediction's pixels on GT void; above 0.5 a match is unique;
- crowd GT segments are never matched and never false negatives; an unmatched prediction is
  no false positive when more than half of it lies on void plus its own category's crowd;
- segment areas are counted in the id maps, never taken from the json.

Per category, PQ = sum IoU / (TP + FP/2 + FN/2), SQ = sum IoU / TP (0 without TP) and
RQ = TP / (TP + FP/2 + FN/2); a group's numbers are means over its categories that have any
TP, FP or FN (``n`` of them). Everything is a fraction in [0, 1].
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from PIL import Image

from instseg_pipeline.data.masks import decode_strings, id_to_rgb, rgb_to_id
from instseg_pipeline.evaluation import MetricInputError
from instseg_pipeline.progress import progress

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

VOID = 0
GROUPS = {"all": None, "things": True, "stuff": False}
_OFFSET = 2 ** 32  # gt_id * _OFFSET + pred_id packs an id pair into one int64
_MAX_ID = 2 ** 31 - 1
_PROGRESS_MIN_IMAGES = 10
_ANNOTATION_KEYS = {"image_id", "file_name", "segments_info"}


class PanopticSample(NamedTuple):
    """One image's ground truth and prediction.

    gt_ids, pred_ids: integer [H, W] segment id maps (0 = void); gt_segments, pred_segments:
    segments_info lists; gt_name, pred_name: how error messages name each side (a PNG path).
    """

    image_id: int
    gt_ids: np.ndarray
    gt_segments: Sequence[Mapping]
    pred_ids: np.ndarray
    pred_segments: Sequence[Mapping]
    gt_name: str = "ground-truth id map"
    pred_name: str = "prediction id map"


@dataclass
class CategoryStats:
    """Counts of one category over the images seen so far."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    iou: float = 0.0

    @property
    def counted(self) -> bool:
        return self.tp + self.fp + self.fn > 0


# ---------------------------------------------------------------- PNG <-> id map
def read_id_map(path: str | Path) -> np.ndarray:
    """int32 [H, W] ids of a panoptic PNG; `MetricInputError` naming the file otherwise."""
    try:
        with Image.open(path) as image:
            if image.mode not in ("RGB", "RGBA", "P"):
                raise MetricInputError(f"panoptic PNG {path} has mode {image.mode}; "
                                       "expected an RGB-encoded id image")
            rgb = np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise MetricInputError(f"panoptic PNG {path} not found") from None
    except OSError as exc:
        raise MetricInputError(f"cannot read panoptic PNG {path}: {exc}") from exc
    return rgb_to_id(rgb)


def write_id_map(path: str | Path, id_map: np.ndarray) -> None:
    """Save an integer [H, W] id map as a COCO panoptic PNG."""
    Image.fromarray(id_to_rgb(id_map), mode="RGB").save(path)


# ---------------------------------------------------------------- one image
def _pair_areas(gt_ids: np.ndarray, pred_ids: np.ndarray) -> dict[tuple[int, int], int]:
    """Pixel count of every (gt id, pred id) pair present, void pairs included."""
    packed = gt_ids.astype(np.int64) * _OFFSET + pred_ids.astype(np.int64)
    labels, counts = np.unique(packed, return_counts=True)
    pairs = zip((labels // _OFFSET).tolist(), (labels % _OFFSET).tolist())
    return dict(zip(pairs, counts.tolist()))


def _areas(pairs: Mapping[tuple[int, int], int], side: int) -> dict[int, int]:
    """Segment areas of one side (0 = GT, 1 = prediction) summed from the pair table."""
    areas: dict[int, int] = {}
    for pair, count in pairs.items():
        areas[pair[side]] = areas.get(pair[side], 0) + count
    return areas


def _check_maps(sample: PanopticSample) -> None:
    for name, ids in ((sample.gt_name, sample.gt_ids), (sample.pred_name, sample.pred_ids)):
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise MetricInputError(f"image {sample.image_id}: {name} is not an integer "
                                   f"[H, W] id map (shape {ids.shape}, dtype {ids.dtype})")
        if ids.size and (ids.min() < 0 or ids.max() > _MAX_ID):
            raise MetricInputError(f"image {sample.image_id}: {name} holds ids outside "
                                   f"[0, {_MAX_ID}]")
    if sample.gt_ids.shape != sample.pred_ids.shape:
        raise MetricInputError(
            f"image {sample.image_id}: {sample.pred_name} is {_size(sample.pred_ids)} but "
            f"{sample.gt_name} is {_size(sample.gt_ids)}")


def _size(ids: np.ndarray) -> str:
    return "x".join(str(v) for v in ids.shape[::-1]) + " (width x height)"


def _parse_segments(segments: Sequence[Mapping], categories: Mapping[int, bool],
                    where: str) -> dict[int, tuple[int, bool]]:
    """{segment id: (category id, iscrowd)} of a segments_info list, checked."""
    table: dict[int, tuple[int, bool]] = {}
    for segment in segments:
        try:
            seg_id, cat = int(segment["id"]), int(segment["category_id"])
        except (KeyError, TypeError, ValueError):
            raise MetricInputError(f"{where}: malformed segment {segment!r}") from None
        if seg_id == VOID or seg_id in table:
            raise MetricInputError(f"{where}: segment id {seg_id} is void or repeated")
        if cat not in categories:
            raise MetricInputError(f"{where}: segment {seg_id} has unknown category id {cat}")
        table[seg_id] = (cat, bool(segment.get("iscrowd", 0)))
    return table


def _check_ids_agree(table: Mapping[int, tuple], present: Iterable[int], where: str) -> None:
    present = set(present) - {VOID}
    only_map, only_info = sorted(present - set(table)), sorted(set(table) - present)
    if only_map:
        raise MetricInputError(f"{where}: segment ids {only_map} are in the PNG but not in "
                               "segments_info")
    if only_info:
        raise MetricInputError(f"{where}: segment ids {only_info} are in segments_info but "
                               "not in the PNG")


def _segment_tables(sample: PanopticSample, categories: Mapping[int, bool],
                    gt_area: Mapping[int, int], pred_area: Mapping[int, int]):
    where_gt = f"image {sample.image_id}: {sample.gt_name}"
    where_pred = f"image {sample.image_id}: {sample.pred_name}"
    gt = _parse_segments(sample.gt_segments, categories, where_gt)
    pred = _parse_segments(sample.pred_segments, categories, where_pred)
    _check_ids_agree(gt, gt_area, where_gt)
    _check_ids_agree(pred, pred_area, where_pred)
    return gt, pred


def _match(pairs, gt, pred, gt_area, pred_area, stats) -> tuple[set[int], set[int]]:
    """Count TPs into ``stats``; return the matched GT and prediction ids."""
    matched_gt, matched_pred = set(), set()
    for (g, p), inter in pairs.items():
        if g not in gt or p not in pred or gt[g][1] or gt[g][0] != pred[p][0]:
            continue
        # Prediction pixels on unlabelled GT are not held against the prediction.
        union = pred_area[p] + gt_area[g] - inter - pairs.get((VOID, p), 0)
        iou = inter / union
        if iou > 0.5:  # segments do not overlap, so above 0.5 a match is unique
            stats[gt[g][0]].tp += 1
            stats[gt[g][0]].iou += iou
            matched_gt.add(g)
            matched_pred.add(p)
    return matched_gt, matched_pred


def _count_false_negatives(gt, matched_gt, stats) -> None:
    for g, (cat, crowd) in gt.items():
        if g not in matched_gt and not crowd:
            stats[cat].fn += 1


def _ignored_area(pairs, gt) -> dict[tuple[int, int], int]:
    """{(pred id, category): pixels of the prediction on that category's crowd}.

    Every crowd segment of the category counts (COCO GT has at most one per category)."""
    hits: dict[tuple[int, int], int] = {}
    for (g, p), count in pairs.items():
        if g in gt and gt[g][1]:
            key = (p, gt[g][0])
            hits[key] = hits.get(key, 0) + count
    return hits


def _count_false_positives(pairs, gt, pred, pred_area, matched_pred, stats) -> None:
    crowd = _ignored_area(pairs, gt)
    for p, (cat, _) in pred.items():
        if p in matched_pred:
            continue
        ignored = pairs.get((VOID, p), 0) + crowd.get((p, cat), 0)
        if ignored / pred_area[p] <= 0.5:
            stats[cat].fp += 1


def accumulate_image(sample: PanopticSample, categories: Mapping[int, bool],
                     stats: Mapping[int, CategoryStats]) -> None:
    """Add one image's TP / FP / FN / IoU sums to ``stats`` (keyed by category id)."""
    _check_maps(sample)
    pairs = _pair_areas(sample.gt_ids, sample.pred_ids)
    gt_area, pred_area = _areas(pairs, 0), _areas(pairs, 1)
    gt, pred = _segment_tables(sample, categories, gt_area, pred_area)
    matched_gt, matched_pred = _match(pairs, gt, pred, gt_area, pred_area, stats)
    _count_false_negatives(gt, matched_gt, stats)
    _count_false_positives(pairs, gt, pred, pred_area, matched_pred, stats)


# ---------------------------------------------------------------- summaries
def category_scores(stats: CategoryStats) -> dict:
    """{"pq", "sq", "rq", "tp", "fp", "fn"} of one category (scores 0 when uncounted)."""
    denominator = stats.tp + 0.5 * stats.fp + 0.5 * stats.fn
    counts = {"tp": stats.tp, "fp": stats.fp, "fn": stats.fn}
    if denominator == 0:
        return {"pq": 0.0, "sq": 0.0, "rq": 0.0, **counts}
    return {"pq": stats.iou / denominator, "sq": stats.iou / stats.tp if stats.tp else 0.0,
            "rq": stats.tp / denominator, **counts}


def _group_mean(stats: Mapping[int, CategoryStats], categories: Mapping[int, bool],
                isthing: bool | None) -> dict:
    scores = [category_scores(stats[cat]) for cat, thing in categories.items()
              if (isthing is None or thing == isthing) and stats[cat].counted]
    n = len(scores)
    # With nothing to average the means are reported as 0 and n = 0 says why.
    means = {key: sum(s[key] for s in scores) / n if n else 0.0 for key in ("pq", "sq", "rq")}
    return {**means, "n": n}


def summarize(stats: Mapping[int, CategoryStats], categories: Mapping[int, bool]) -> dict:
    """{"all", "things", "stuff"} group means plus "per_category" {category id: scores}."""
    result = {name: _group_mean(stats, categories, isthing) for name, isthing in GROUPS.items()}
    result["per_category"] = {cat: category_scores(stats[cat]) for cat in categories}
    return result


def parse_categories(categories: Iterable[Mapping]) -> dict[int, bool]:
    """{category id: isthing} of COCO panoptic category dicts."""
    try:
        table = {int(c["id"]): bool(c["isthing"]) for c in categories}
    except (KeyError, TypeError, ValueError) as exc:
        raise MetricInputError(f"categories need 'id' and 'isthing' fields ({exc!r})") from None
    if not table:
        raise MetricInputError("no categories given")
    return table


def _progress(samples: Iterable[PanopticSample], total: int | None) -> Iterable:
    if total is None and isinstance(samples, Sequence):
        total = len(samples)
    quiet = total is not None and total <= _PROGRESS_MIN_IMAGES
    return progress(samples, total=total, disable=quiet, desc="panoptic quality",
                    unit="image", logger=logger)


def pq_from_arrays(samples: Iterable[PanopticSample], categories: Iterable[Mapping],
                   total: int | None = None) -> dict:
    """PQ / SQ / RQ of in-memory id maps.

    samples: `PanopticSample`s (a generator is fine; ``total`` sizes its progress bar);
    categories: dicts with "id" and "isthing". Returns {"all", "things", "stuff"}, each
    {"pq", "sq", "rq", "n"}, plus "per_category" {id: {"pq", "sq", "rq", "tp", "fp", "fn"}}.
    """
    table = parse_categories(categories)
    stats = {cat: CategoryStats() for cat in table}
    count = 0
    for sample in _progress(samples, total):
        accumulate_image(sample, table, stats)
        count += 1
    result = summarize(stats, table)
    logger.info("panoptic quality over %d images: PQ %.4f (things %.4f, stuff %.4f)",
                count, result["all"]["pq"], result["things"]["pq"], result["stuff"]["pq"])
    return result


# ---------------------------------------------------------------- COCO panoptic files
def _require_keys(data, keys: Sequence[str], name: str) -> None:
    if not isinstance(data, Mapping):
        raise MetricInputError(f"{name} is not a JSON object")
    missing = [key for key in keys if key not in data]
    if missing:
        raise MetricInputError(f"{name} lacks keys {missing}")


def _load_json(path: str | Path, keys: Sequence[str]) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise MetricInputError(f"json file {path} not found") from None
    except (OSError, ValueError) as exc:
        raise MetricInputError(f"cannot read json file {path}: {exc}") from exc
    _require_keys(data, keys, f"json file {path}")
    return data


def _existing_folder(folder: str | Path, name: str) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise MetricInputError(f"{name} PNG folder {folder} not found")
    return folder


def _by_image(annotations: Iterable[Mapping], name: str) -> dict[int, Mapping]:
    indexed: dict[int, Mapping] = {}
    for ann in annotations:
        if not isinstance(ann, Mapping) or not _ANNOTATION_KEYS <= set(ann):
            raise MetricInputError(f"{name} has an annotation without "
                                   f"{sorted(_ANNOTATION_KEYS)}: {str(ann)[:200]}")
        image_id = int(ann["image_id"])
        if image_id in indexed:
            raise MetricInputError(f"{name} has two annotations for image {image_id}")
        indexed[image_id] = ann
    return indexed


def _pair_annotations(gt_json: Mapping, pred_json: Mapping) -> list[tuple[Mapping, Mapping]]:
    gt = _by_image(gt_json["annotations"], "ground-truth json")
    pred = _by_image(pred_json["annotations"], "prediction json")
    unknown = sorted(set(pred) - set(gt))
    if unknown:
        raise MetricInputError(f"prediction json has images {unknown[:10]} that are not in "
                               "the ground truth")
    missing = sorted(set(gt) - set(pred))
    if missing:
        raise MetricInputError(f"prediction json has no annotation for images {missing[:10]}")
    return [(gt[image_id], pred[image_id]) for image_id in gt]


def _load_sample(gt_ann: Mapping, pred_ann: Mapping, gt_folder: Path,
                 pred_folder: Path) -> PanopticSample:
    gt_path, pred_path = gt_folder / gt_ann["file_name"], pred_folder / pred_ann["file_name"]
    return PanopticSample(int(gt_ann["image_id"]), read_id_map(gt_path), gt_ann["segments_info"],
                          read_id_map(pred_path), pred_ann["segments_info"],
                          gt_name=f"ground-truth PNG {gt_path}",
                          pred_name=f"prediction PNG {pred_path}")


def pq_compute(gt_json: dict, gt_folder: str | Path, pred_json: dict,
               pred_folder: str | Path) -> dict:
    """PQ of COCO panoptic predictions (json dict + PNG folder) against the ground truth.

    Every GT image needs one prediction annotation. Returns what `pq_from_arrays` returns.
    """
    _require_keys(gt_json, ("annotations", "categories"), "ground-truth json")
    _require_keys(pred_json, ("annotations",), "prediction json")
    gt_folder = _existing_folder(gt_folder, "ground-truth")
    pred_folder = _existing_folder(pred_folder, "prediction")
    pairs = _pair_annotations(gt_json, pred_json)
    samples = (_load_sample(g, p, gt_folder, pred_folder) for g, p in pairs)
    return pq_from_arrays(samples, gt_json["categories"], total=len(pairs))


def pq_from_files(gt_json_path: str | Path, gt_folder: str | Path, pred_json_path: str | Path,
                  pred_folder: str | Path) -> dict:
    """{"all", "things", "stuff"} ({"pq", "sq", "rq", "n"} each) from COCO panoptic files."""
    gt_json = _load_json(gt_json_path, ("annotations", "categories"))
    pred_json = _load_json(pred_json_path, ("annotations",))
    result = pq_compute(gt_json, gt_folder, pred_json, pred_folder)
    return {name: result[name] for name in GROUPS}


# ---------------------------------------------------------------- instances -> panoptic
def _bbox(mask: np.ndarray) -> list[int]:
    """COCO [x, y, w, h] of a non-empty bool [H, W] mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def _segment_info(seg_id: int, category_id: int, mask: np.ndarray, iscrowd: bool) -> dict:
    return {"id": seg_id, "category_id": int(category_id), "iscrowd": int(iscrowd),
            "area": int(mask.sum()), "bbox": _bbox(mask)}


def _unclaimed_part(mask: np.ndarray, id_map: np.ndarray, overlap_threshold: float,
                    min_area: int) -> np.ndarray | None:
    """The free pixels of ``mask``, or None when too much of it is already taken."""
    area = int(mask.sum())
    free = mask & (id_map == VOID)
    free_area = int(free.sum())
    if area == 0 or (area - free_area) / area > overlap_threshold or free_area < min_area:
        return None
    return free


def _check_instances(masks: np.ndarray, *columns: np.ndarray) -> None:
    if masks.ndim != 3:
        raise MetricInputError(f"masks must be [N, H, W], got shape {masks.shape}")
    for column in columns:
        if column.shape != (masks.shape[0],):
            raise MetricInputError(f"expected {masks.shape[0]} values per instance, got "
                                   f"shape {column.shape}")


def instances_to_panoptic(masks: np.ndarray, scores: np.ndarray, category_ids: np.ndarray,
                          overlap_threshold: float = 0.5, min_area: int = 1,
                          score_threshold: float = 0.5) -> tuple[np.ndarray, list[dict]]:
    """Non-overlapping thing segments from instance predictions.

    masks: uint8 [N, H, W] (nonzero = foreground); scores: float [N]; category_ids: int [N].
    Higher scores paint first; a lower-scoring mask keeps only pixels still free and is dropped
    when more than ``overlap_threshold`` of it is taken or fewer than ``min_area`` pixels stay
    free. Instances scoring below ``score_threshold`` are left out (Panoptic FPN uses 0.5).
    Returns (id_map int32 [H, W] with segment ids 1..K and 0 = void, segments_info with
    id, category_id, iscrowd=0, area, bbox and score).
    """
    masks, scores = np.asarray(masks), np.asarray(scores, dtype=np.float64)
    category_ids = np.asarray(category_ids)
    _check_instances(masks, scores, category_ids)
    id_map = np.zeros(masks.shape[1:], dtype=np.int32)
    segments: list[dict] = []
    for index in np.argsort(-scores, kind="stable"):
        if scores[index] < score_threshold:
            break
        free = _unclaimed_part(masks[index] > 0, id_map, overlap_threshold, min_area)
        if free is not None:
            id_map[free] = len(segments) + 1
            segments.append({**_segment_info(len(segments) + 1, category_ids[index], free, False),
                             "score": float(scores[index])})
    return id_map, segments


def _sole_owner(masks: np.ndarray, selected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(owner, cover), int [H, W] each: the index of the only selected mask covering a
    pixel (-1 where none or several do) and how many selected masks cover it."""
    indices = np.flatnonzero(selected)
    if indices.size == 0:
        empty = np.zeros(masks.shape[1:], dtype=np.int64)
        return empty - 1, empty
    chosen = masks[indices]
    cover = chosen.sum(axis=0, dtype=np.int64)
    return np.where(cover == 1, indices[chosen.argmax(axis=0)], -1), cover


def instances_to_panoptic_gt(masks: np.ndarray, category_ids: np.ndarray, iscrowd: np.ndarray,
                             instance_ids: np.ndarray | None = None
                             ) -> tuple[np.ndarray, list[dict]]:
    """A ground-truth panoptic id map from (possibly overlapping) instance masks.

    masks: uint8 [N, H, W]; category_ids: int [N]; iscrowd: bool [N]. A pixel belongs to
    the one non-crowd instance covering it; pixels two or more non-crowd instances claim
    become void, since the tables cannot say whose they are. Crowd regions fill pixels no
    non-crowd instance covers, under the same rule. Instances left with no pixel are
    omitted. Returns (id_map int32 [H, W], segments_info with ids 1..K in input order,
    iscrowd flagged, and "instance_id" when ``instance_ids`` is given).
    """
    masks = np.asarray(masks) > 0
    category_ids, crowd = np.asarray(category_ids), np.asarray(iscrowd, dtype=bool)
    _check_instances(masks, category_ids, crowd)
    owner, cover = _sole_owner(masks, ~crowd)
    crowd_owner, _ = _sole_owner(masks, crowd)
    owner = np.where(cover == 0, crowd_owner, owner)
    lookup = np.zeros(masks.shape[0] + 1, dtype=np.int32)
    segments: list[dict] = []
    for index in range(masks.shape[0]):
        own = owner == index
        if own.any():
            lookup[index + 1] = len(segments) + 1
            info = _segment_info(len(segments) + 1, category_ids[index], own, crowd[index])
            if instance_ids is not None:
                info["instance_id"] = int(instance_ids[index])
            segments.append(info)
    return lookup[owner + 1], segments


# ---------------------------------------------------------------- canonical tables
def panoptic_categories(categories: pd.DataFrame) -> list[dict]:
    """COCO panoptic category dicts ({"id", "name", "isthing"}) of the categories table."""
    return [{"id": int(r.category_id), "name": str(r.name), "isthing": int(bool(r.isthing))}
            for r in categories.itertuples(index=False)]


def panoptic_gt_from_tables(image: Mapping, instances: pd.DataFrame,
                            stuff: pd.DataFrame | None = None
                            ) -> tuple[np.ndarray, list[dict]]:
    """GT id map int32 [H, W] and segments_info of one ``images`` row from its instances
    and, when given, its ``stuff_segments`` rows.

    ``instances`` holds that image's rows of the instances table (things only, crowd kept),
    resolved by `instances_to_panoptic_gt`. Stuff segments fill only the pixels no thing
    mask covers (crowd included), under the same rule among themselves; their ids follow
    the things'.
    """
    height, width = int(image["height"]), int(image["width"])
    masks = decode_strings([str(c) for c in instances["rle"]], height, width)
    ids, segments = instances_to_panoptic_gt(masks, instances["category_id"].to_numpy(),
                                             instances["iscrowd"].to_numpy(dtype=bool),
                                             instances["instance_id"].to_numpy())
    if stuff is None or len(stuff) == 0:
        return ids, segments
    covered = masks.any(axis=0) if len(masks) else np.zeros((height, width), dtype=bool)
    stuff_masks = decode_strings([str(c) for c in stuff["rle"]], height, width) > 0
    stuff_ids, stuff_segments = instances_to_panoptic_gt(
        stuff_masks & ~covered, stuff["category_id"].to_numpy(),
        stuff["iscrowd"].to_numpy(dtype=bool), stuff["instance_id"].to_numpy())
    offset = len(segments)
    ids = np.where(stuff_ids > 0, stuff_ids + offset, ids).astype(np.int32)
    return ids, segments + [{**s, "id": s["id"] + offset} for s in stuff_segments]


def _prediction_from_table(image: Mapping, predictions: pd.DataFrame,
                           options: Mapping) -> tuple[np.ndarray, list[dict]]:
    height, width = int(image["height"]), int(image["width"])
    masks = decode_strings([str(c) for c in predictions["rle"]], height, width)
    return instances_to_panoptic(masks, predictions["score"].to_numpy(),
                                 predictions["category_id"].to_numpy(), **options)


def _table_samples(images: pd.DataFrame, instances: pd.DataFrame, predictions: pd.DataFrame,
                   options: Mapping) -> Iterator[PanopticSample]:
    gt_groups = dict(tuple(instances.groupby("image_id")))
    pred_groups = dict(tuple(predictions.groupby("image_id")))
    empty_gt, empty_pred = instances.iloc[:0], predictions.iloc[:0]
    for image in images.to_dict("records"):
        image_id = int(image["image_id"])
        gt_ids, gt_segments = panoptic_gt_from_tables(image, gt_groups.get(image_id, empty_gt))
        pred_ids, pred_segments = _prediction_from_table(
            image, pred_groups.get(image_id, empty_pred), options)
        yield PanopticSample(image_id, gt_ids, gt_segments, pred_ids, pred_segments,
                             gt_name="ground-truth instances", pred_name="predictions")


def pq_from_tables(images: pd.DataFrame, instances: pd.DataFrame, categories: pd.DataFrame,
                   predictions: pd.DataFrame, overlap_threshold: float = 0.5,
                   min_area: int = 1, score_threshold: float = 0.5) -> dict:
    """PQ of instance predictions against the canonical tables (for sources with no PNGs).

    ``images`` lists the images evaluated (select the split first); ``predictions`` has
    columns image_id, category_id, score and rle (compressed COCO RLE string). GT comes from
    `panoptic_gt_from_tables`, predictions from `instances_to_panoptic` with the options.
    Returns what `pq_from_arrays` returns.
    """
    missing = [c for c in ("image_id", "category_id", "score", "rle") if c not in predictions]
    if missing:
        raise MetricInputError(f"predictions table lacks columns {missing}")
    unknown = sorted(set(predictions["image_id"].tolist()) - set(images["image_id"].tolist()))
    if unknown:
        raise MetricInputError(f"predictions for images {unknown[:10]} that are not evaluated")
    options = {"overlap_threshold": overlap_threshold, "min_area": min_area,
               "score_threshold": score_threshold}
    samples = _table_samples(images, instances, predictions, options)
    return pq_from_arrays(samples, panoptic_categories(categories), total=len(images))


# ---------------------------------------------------------------- panoptic predictions
def _predicted_categories(predictions: Mapping, categories: Mapping[int, bool]) -> set[int]:
    """The category ids a panoptic prediction set covers (its json's "categories")."""
    try:
        ids = {int(c["id"]) for c in predictions["categories"]}
    except (KeyError, TypeError, ValueError) as exc:
        raise MetricInputError(f"panoptic predictions: malformed categories ({exc!r})") from None
    unknown = sorted(ids - set(categories))
    if unknown:
        raise MetricInputError(f"panoptic predictions name categories {unknown} that are not "
                               "in the categories table")
    return ids


def _prediction_annotations(predictions: Mapping, image_ids: Sequence[int]) -> dict:
    _require_keys(predictions, ("annotations", "categories", "pngs"), "panoptic predictions")
    by_image = _by_image(predictions["annotations"], "panoptic predictions")
    unknown = sorted(set(by_image) - set(image_ids))
    if unknown:
        raise MetricInputError(f"panoptic predictions for images {unknown[:10]} that are not "
                               "evaluated")
    missing = sorted(set(image_ids) - set(by_image))
    if missing:
        raise MetricInputError(f"panoptic predictions have no annotation for images "
                               f"{missing[:10]}")
    return by_image


def _predicted_ids(predictions: Mapping, annotation: Mapping) -> np.ndarray:
    name = str(annotation["file_name"])
    try:
        return np.asarray(predictions["pngs"][name])
    except KeyError:
        raise MetricInputError(f"panoptic predictions: image {annotation['image_id']} names "
                               f"PNG {name}, which is not among them") from None


def _ground_truth_maps(images: pd.DataFrame, instances: pd.DataFrame,
                       stuff_segments: pd.DataFrame
                       ) -> Iterator[tuple[int, np.ndarray, list[dict]]]:
    """(image id, GT id map, segments_info) per ``images`` row, from the tables."""
    gt_groups = dict(tuple(instances.groupby("image_id")))
    stuff_groups = dict(tuple(stuff_segments.groupby("image_id")))
    empty_gt = instances.iloc[:0]
    for image in images.to_dict("records"):
        image_id = int(image["image_id"])
        gt_ids, gt_segments = panoptic_gt_from_tables(
            image, gt_groups.get(image_id, empty_gt), stuff_groups.get(image_id))
        yield image_id, gt_ids, gt_segments


def _scored_stuff(stuff_segments: pd.DataFrame | None, covered: set[int],
                  table: Mapping[int, bool]) -> pd.DataFrame:
    """The stuff segments of the stuff categories a prediction set covers (none for an
    instance model: it is scored on things only)."""
    from instseg_pipeline.data.tables import make_instances

    stuff = make_instances([]) if stuff_segments is None else stuff_segments
    return stuff[stuff["category_id"].isin([c for c in covered if not table[c]])]


def _prediction_samples(images: pd.DataFrame, instances: pd.DataFrame,
                        stuff_segments: pd.DataFrame, predictions: Mapping,
                        annotations: Mapping[int, Mapping]) -> Iterator[PanopticSample]:
    for image_id, gt_ids, gt_segments in _ground_truth_maps(images, instances,
                                                            stuff_segments):
        annotation = annotations[image_id]
        yield PanopticSample(image_id, gt_ids, gt_segments,
                             _predicted_ids(predictions, annotation),
                             annotation["segments_info"], gt_name="ground-truth tables",
                             pred_name=f"panoptic prediction {annotation['file_name']}")


def pq_from_predictions(images: pd.DataFrame, instances: pd.DataFrame,
                        stuff_segments: pd.DataFrame | None, categories: pd.DataFrame,
                        predictions: Mapping) -> dict:
    """PQ of panoptic predictions against the canonical tables.

    ``images``: the images evaluated (select the split first), every one with an annotation
    in ``predictions``; ``predictions``: ``{"annotations": [{"image_id", "file_name",
    "segments_info"}], "categories": [{"id", "isthing", ...}], "pngs": {file_name: integer
    [H, W] id map}}`` (what `predict.panoptic.panoptic_outputs` returns and the
    ``panoptic_predictions`` dataset stores). Ground truth: the things of ``instances``
    plus the ``stuff_segments`` of the stuff categories the predictions cover; a model
    without stuff is scored on things only (stuff n = 0). Returns what `pq_from_arrays`
    returns.
    """
    table = parse_categories(panoptic_categories(categories))
    annotations = _prediction_annotations(predictions, images["image_id"].astype(int).tolist())
    stuff = _scored_stuff(stuff_segments, _predicted_categories(predictions, table), table)
    samples = _prediction_samples(images, instances, stuff, predictions, annotations)
    return pq_from_arrays(samples, panoptic_categories(categories), total=len(images))


def panoptic_ground_truth(images: pd.DataFrame, instances: pd.DataFrame,
                          stuff_segments: pd.DataFrame | None, categories: pd.DataFrame,
                          predictions: Mapping) -> dict:
    """The ground truth `pq_from_predictions` scores ``predictions`` against, in the same
    form (``{"annotations", "categories", "pngs"}``, PNG names as the predictions'), so
    that saved as COCO panoptic files `pq_from_files` on both gives the same numbers.

    ``images``: the evaluated images (select the split first). Things from ``instances``;
    stuff only of the stuff categories the predictions cover.
    """
    table = parse_categories(panoptic_categories(categories))
    annotations = _prediction_annotations(predictions, images["image_id"].astype(int).tolist())
    stuff = _scored_stuff(stuff_segments, _predicted_categories(predictions, table), table)
    out, pngs = [], {}
    for image_id, gt_ids, gt_segments in _ground_truth_maps(images, instances, stuff):
        name = str(annotations[image_id]["file_name"])
        pngs[name] = gt_ids
        out.append({"image_id": image_id, "file_name": name, "segments_info": gt_segments})
    return {"annotations": out, "categories": panoptic_categories(categories), "pngs": pngs}
