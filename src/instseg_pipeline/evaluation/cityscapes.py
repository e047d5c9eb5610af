"""Cityscapes instance-level AP: the benchmark's ``AP`` and ``AP50%``.

The rules are those of the official Cityscapes instance-level evaluation
(``cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling``), reimplemented on arrays:

- Ground truth comes from a gtFine ``*_instanceIds.png`` map: a value ``v >= 1000`` is
  instance ``v % 1000`` of label id ``v // 1000``; a bare label id ``v < 1000`` of an
  instance class is a *group* region ("cars" drawn without separate outlines). Pixels whose
  value is a label id ignored in evaluation (`VOID_LABEL_IDS`) are *void*. Only the 8
  evaluated classes (person ... bicycle) count.
- Overlap is the IoU of the prediction with a ground-truth instance of its label; the
  thresholds are 0.5, 0.55, ..., 0.95; a match needs overlap strictly above the threshold.
- Ground-truth instances smaller than 100 px (``min_region_size``) and group regions are not
  counted: a prediction matching one is neither a true nor a false positive.
- A ground-truth instance with several matching predictions keeps the best score as a true
  positive; the others are false positives.
- An unmatched prediction is a false positive unless more than the threshold's fraction of
  its pixels lies on void, group regions and small instances (pixels of a region that is
  both group and small count twice, as in the official script).
- Per class and threshold, AP integrates the precision/recall curve over unique scores with
  the official step rule; a class with ground truth but no prediction scores 0, a class
  without ground truth is left out (NaN). ``AP`` averages classes and thresholds, ``AP50``
  classes at 0.5.

Two entry points build the per-image `ImageMatches`: `match_id_map` (a gtFine map and
prediction bitmaps, the official input) and `match_rles` (COCO RLEs of ground truth and
predictions, e.g. the canonical tables of any source: crowd regions act as groups, there is
no void). `evaluate` turns them into the numbers. `evaluate_folders` reads the official file
layout (gtFine PNGs + one ``.txt`` of ``mask.png label_id score`` lines per image).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from instseg_pipeline.evaluation import MetricInputError

LABEL_FACTOR = 1000
MIN_REGION_SIZE = 100
OVERLAPS = np.arange(0.5, 1.0, 0.05)  # as the official script builds them (0.5 ... 0.95)
# label ids with ``ignoreInEval`` in the official label table (license plate, -1, never
# appears in instanceIds maps). Caravan / trailer *instances* (29xxx, 30xxx) are not void:
# the official script compares pixel values with these ids, so only their group pixels are.
VOID_LABEL_IDS = (0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30)
CLASSES = {24: "person", 25: "rider", 26: "car", 27: "truck", 28: "bus", 31: "train",
           32: "motorcycle", 33: "bicycle"}
GT_SUFFIX = "_gtFine_instanceIds.png"


@dataclass(frozen=True)
class ImageMatches:
    """What one image contributes: ground-truth regions, predictions and their overlaps.

    gt_labels int64 [G]; gt_pixels int64 [G]; gt_group bool [G];
    pred_labels int64 [P]; pred_scores float64 [P]; pred_pixels int64 [P];
    pred_void int64 [P] (prediction pixels on void);
    intersection int64 [P, G] (pixels shared; counted only where the labels agree).
    """

    gt_labels: np.ndarray
    gt_pixels: np.ndarray
    gt_group: np.ndarray
    pred_labels: np.ndarray
    pred_scores: np.ndarray
    pred_pixels: np.ndarray
    pred_void: np.ndarray
    intersection: np.ndarray


# --- building ImageMatches ---------------------------------------------------------------

def _predictions(labels, scores, pixels: np.ndarray, classes: Mapping[int, str],
                 where: str) -> np.ndarray:
    """Indices of the predictions that take part: a known class and at least one pixel."""
    labels, scores = np.asarray(labels, np.int64), np.asarray(scores, np.float64)
    if labels.shape != scores.shape or labels.shape != pixels.shape:
        raise MetricInputError(f"{where}: {len(pixels)} prediction masks, {labels.size} labels "
                               f"and {scores.size} scores; they must be as many")
    if not np.isfinite(scores).all():
        bad = int(np.flatnonzero(~np.isfinite(scores))[0])
        raise MetricInputError(f"{where}: prediction {bad} has a non-finite score")
    known = np.isin(labels, np.fromiter(classes, np.int64, len(classes)))
    return np.flatnonzero(known & (pixels > 0))


def match_id_map(gt_ids: np.ndarray, pred_masks, pred_labels, pred_scores,
                 classes: Mapping[int, str] = CLASSES,
                 void_label_ids: Sequence[int] = VOID_LABEL_IDS,
                 where: str = "image") -> ImageMatches:
    """`ImageMatches` of a gtFine instanceIds map and bool prediction masks ``[P, H, W]``."""
    gt_ids = np.asarray(gt_ids, np.int64)
    masks = np.asarray(pred_masks, bool) if len(pred_masks) else \
        np.zeros((0, *gt_ids.shape), bool)
    if masks.ndim != 3 or masks.shape[1:] != gt_ids.shape:
        raise MetricInputError(f"{where}: prediction masks are {masks.shape[1:]}, the ground "
                               f"truth {gt_ids.shape}")
    values, inverse = np.unique(gt_ids, return_inverse=True)
    inverse = inverse.reshape(-1)
    labels = np.where(values >= LABEL_FACTOR, values // LABEL_FACTOR, values)
    keep = np.isin(labels, np.fromiter(classes, np.int64, len(classes)))
    void = np.isin(values, np.asarray(void_label_ids, np.int64))
    pixels = masks.reshape(len(masks), gt_ids.size).sum(axis=1)
    chosen = _predictions(pred_labels, pred_scores, pixels, classes, where)
    counts = np.stack([np.bincount(inverse[masks[i].reshape(-1)], minlength=len(values))
                       for i in chosen]) if len(chosen) else np.zeros((0, len(values)), np.int64)
    gt_labels = labels[keep]
    pred_labels = np.asarray(pred_labels, np.int64)[chosen]
    intersection = counts[:, keep] * (pred_labels[:, None] == gt_labels[None, :])
    return ImageMatches(
        gt_labels=gt_labels, gt_pixels=np.bincount(inverse, minlength=len(values))[keep],
        gt_group=values[keep] < LABEL_FACTOR, pred_labels=pred_labels,
        pred_scores=np.asarray(pred_scores, np.float64)[chosen], pred_pixels=pixels[chosen],
        pred_void=counts[:, void].sum(axis=1).astype(np.int64),
        intersection=intersection.astype(np.int64))


def match_rles(gt_rles: Sequence[dict], gt_labels, gt_group, pred_rles: Sequence[dict],
               pred_labels, pred_scores, classes: Mapping[int, str],
               void_rle: dict | None = None, where: str = "image") -> ImageMatches:
    """`ImageMatches` of compressed COCO RLEs (all of one image's size)."""
    from pycocotools import mask as mask_utils

    gt_labels = np.asarray(gt_labels, np.int64).reshape(-1)
    gt_group = np.asarray(gt_group, bool).reshape(-1)
    known = np.isin(gt_labels, np.fromiter(classes, np.int64, len(classes)))
    gt_rles = [rle for rle, k in zip(gt_rles, known) if k]
    gt_labels, gt_group = gt_labels[known], gt_group[known]
    pixels = np.asarray(mask_utils.area(list(pred_rles)), np.int64).reshape(-1) \
        if len(pred_rles) else np.zeros(0, np.int64)
    chosen = _predictions(pred_labels, pred_scores, pixels, classes, where)
    preds = [pred_rles[i] for i in chosen]
    pred_labels = np.asarray(pred_labels, np.int64)[chosen]
    intersection = np.zeros((len(preds), len(gt_rles)), np.int64)
    if preds and gt_rles:  # iou with the ground truth flagged crowd = intersection / pred area
        ratio = np.asarray(mask_utils.iou(preds, gt_rles, [1] * len(gt_rles)), np.float64)
        intersection = np.rint(ratio * pixels[chosen][:, None]).astype(np.int64)
        intersection *= pred_labels[:, None] == gt_labels[None, :]
    pred_void = np.zeros(len(preds), np.int64)
    if preds and void_rle is not None:
        ratio = np.asarray(mask_utils.iou(preds, [void_rle], [1]), np.float64)[:, 0]
        pred_void = np.rint(ratio * pixels[chosen]).astype(np.int64)
    gt_pixels = np.asarray(mask_utils.area(gt_rles), np.int64).reshape(-1) if gt_rles else \
        np.zeros(0, np.int64)
    return ImageMatches(gt_labels=gt_labels, gt_pixels=gt_pixels, gt_group=gt_group,
                        pred_labels=pred_labels,
                        pred_scores=np.asarray(pred_scores, np.float64)[chosen],
                        pred_pixels=pixels[chosen], pred_void=pred_void,
                        intersection=intersection)


# --- the numbers ---------------------------------------------------------------------------

class _Tally:
    """y_true / y_score / hard false negatives of one class at one threshold."""

    def __init__(self) -> None:
        self.true: list[np.ndarray] = []
        self.score: list[np.ndarray] = []
        self.hard_fn = 0

    def add(self, true, score) -> None:
        self.true.append(np.asarray(true, np.float64))
        self.score.append(np.asarray(score, np.float64))


def _image_class(m: ImageMatches, label: int, threshold: float, min_size: int,
                 tally: _Tally) -> None:
    """Add one image's true positives, false positives and misses of class ``label``."""
    g = np.flatnonzero(m.gt_labels == label)
    p = np.flatnonzero(m.pred_labels == label)
    inter = m.intersection[np.ix_(p, g)].astype(np.float64)
    union = m.gt_pixels[g][None, :] + m.pred_pixels[p][:, None] - inter
    over = np.divide(inter, union, out=np.zeros_like(inter), where=inter > 0) > threshold
    scores = m.pred_scores[p]
    counted = ~m.gt_group[g] & (m.gt_pixels[g] >= min_size)
    for column in np.flatnonzero(counted):
        hits = scores[over[:, column]]
        if hits.size == 0:
            tally.hard_fn += 1
            continue
        best = int(np.argmax(hits))
        tally.add([1.0], [hits[best]])
        tally.add(np.zeros(hits.size - 1), np.delete(hits, best))
    unmatched = ~over.any(axis=1)
    if unmatched.any():
        ignored_gt = m.gt_group[g].astype(np.int64) + (m.gt_pixels[g] < min_size)
        inter_px = m.intersection[np.ix_(p, g)]
        ignore = m.pred_void[p] + (inter_px * ignored_gt[None, :]).sum(axis=1)
        false_pos = unmatched & (ignore / m.pred_pixels[p] <= threshold)
        tally.add(np.zeros(int(false_pos.sum())), scores[false_pos])


def average_precision(true: np.ndarray, score: np.ndarray, hard_fn: int) -> float:
    """Area under the precision/recall curve, as the official script integrates it.

    One point per unique score (everything scored at least that much is a detection), plus
    (recall 0, precision 1); each point's precision weighs half the recall gap to each of its
    neighbours.
    """
    if true.size == 0:
        return 0.0
    order = np.argsort(score, kind="stable")
    true, score = true[order], score[order]
    _, first = np.unique(score, return_index=True)
    below = np.concatenate([[0.0], np.cumsum(true)])[first]  # true positives scored lower
    tp = true.sum() - below
    fp = (true.size - first) - tp
    fn = below + hard_fn
    precision = np.append(tp / (tp + fp), 1.0)
    recall = np.append(tp / (tp + fn), 0.0)
    padded = np.concatenate([[recall[0]], recall, [0.0]])
    return float(np.dot(precision, (padded[:-2] - padded[2:]) / 2.0))


def _class_ap(matches: Sequence[ImageMatches], label: int, threshold: float,
              min_size: int) -> float:
    have_gt = any((~m.gt_group & (m.gt_pixels >= min_size) & (m.gt_labels == label)).any()
                  for m in matches)
    have_pred = any((m.pred_labels == label).any() for m in matches)
    if not have_gt:
        return math.nan
    if not have_pred:
        return 0.0
    tally = _Tally()
    for m in matches:
        _image_class(m, label, threshold, min_size, tally)
    true = np.concatenate(tally.true) if tally.true else np.zeros(0)
    score = np.concatenate(tally.score) if tally.score else np.zeros(0)
    return average_precision(true, score, tally.hard_fn)


def _mean(values: np.ndarray) -> float | None:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else None


def evaluate(matches: Iterable[ImageMatches], classes: Mapping[int, str] = CLASSES,
             overlaps: Sequence[float] = OVERLAPS,
             min_region_size: int = MIN_REGION_SIZE) -> dict:
    """``{"AP", "AP50", "per_class": [{category_id, name, AP, AP50}], "ap_table",
    "overlaps", "min_region_size", "images"}``; None where a class had no ground truth."""
    matches = list(matches)
    overlaps = np.asarray(overlaps, np.float64)
    labels = sorted(classes)
    table = np.array([[_class_ap(matches, label, float(t), min_region_size) for t in overlaps]
                      for label in labels]).reshape(len(labels), len(overlaps))
    at50 = np.flatnonzero(np.isclose(overlaps, 0.5))
    per_class = [{"category_id": int(label), "name": str(classes[label]),
                  "AP": None if np.isnan(row).any() else float(row.mean()),
                  "AP50": None if at50.size == 0 or np.isnan(row[at50]).any()
                  else float(row[at50].mean())}
                 for label, row in zip(labels, table)]
    return {"AP": _mean(table.reshape(-1)),
            "AP50": _mean(table[:, at50].reshape(-1)) if at50.size else None,
            "per_class": per_class,
            "ap_table": [[None if np.isnan(v) else float(v) for v in row] for row in table],
            "overlaps": [round(float(t), 4) for t in overlaps],
            "min_region_size": int(min_region_size),
            "images": len(matches)}


# --- the official file layout ---------------------------------------------------------------

def read_id_map(path: str | Path) -> np.ndarray:
    """A gtFine instanceIds PNG at full bit depth as int64 ``[H, W]``."""
    from instseg_pipeline.data.images import ImageProblem
    from instseg_pipeline.data.images import read_id_map as read_ids

    try:
        return read_ids(Path(path))
    except ImageProblem as exc:
        raise MetricInputError(f"cannot read the ground-truth map: {exc}") from None


def _read_mask(path: Path, where: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise MetricInputError(f"{where}: prediction mask {path} not found")
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("L")) != 0
    except (OSError, UnidentifiedImageError, SyntaxError) as exc:
        raise MetricInputError(f"{where}: cannot read prediction mask {path} ({exc})") from None


def read_prediction_file(path: Path) -> list[tuple[Path, int, float]]:
    """(mask path, label id, score) per line of an official prediction ``.txt``."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        where = f"{path} line {number}"
        if len(parts) != 3:
            raise MetricInputError(f"{where}: expected 'mask.png label_id score', got {line!r}")
        if Path(parts[0]).is_absolute():
            raise MetricInputError(f"{where}: the mask path must be relative to the file")
        try:
            label, score = int(float(parts[1])), float(parts[2])
        except ValueError:
            raise MetricInputError(f"{where}: label id and score must be numbers, got "
                                   f"{parts[1]!r} {parts[2]!r}") from None
        rows.append((path.parent / parts[0], label, score))
    return rows


def _prediction_files(folder: Path) -> dict[str, Path]:
    """``{city_seq_frame: txt}`` over ``folder`` (searched recursively)."""
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*.txt")):
        key = "_".join(path.name.split("_")[:3])
        if key in found:
            raise MetricInputError(f"{folder}: two prediction files for {key}: {found[key]} "
                                   f"and {path}")
        found[key] = path
    return found


def match_files(gt_path: Path, prediction_file: Path | None,
                classes: Mapping[int, str] = CLASSES) -> ImageMatches:
    """`ImageMatches` of one gtFine PNG and its prediction ``.txt`` (None: no predictions)."""
    gt = read_id_map(gt_path)
    rows = read_prediction_file(prediction_file) if prediction_file else []
    where = str(prediction_file or gt_path)
    masks = [_read_mask(path, where) for path, _, _ in rows]
    for (path, _, _), mask in zip(rows, masks):
        if mask.shape != gt.shape:
            raise MetricInputError(f"{where}: mask {path} is {mask.shape[1]}x{mask.shape[0]}, "
                                   f"the ground truth {gt_path} {gt.shape[1]}x{gt.shape[0]}")
    return match_id_map(gt, np.asarray(masks, bool) if masks else [],
                        [r[1] for r in rows], [r[2] for r in rows], classes, where=where)


def evaluate_folders(gt_folder: str | Path, results_folder: str | Path,
                     allow_missing: bool = False, progress: bool = False) -> dict:
    """Official layout: every ``*_gtFine_instanceIds.png`` under ``gt_folder`` against the
    ``{city}_{seq}_{frame}*.txt`` under ``results_folder``. A ground-truth image without a
    prediction file is an error unless ``allow_missing`` (then it has no predictions)."""
    gt_folder, results_folder = Path(gt_folder), Path(results_folder)
    for folder, what in ((gt_folder, "ground-truth"), (results_folder, "results")):
        if not folder.is_dir():
            raise MetricInputError(f"{what} folder {folder} not found")
    gt_files = sorted(gt_folder.rglob(f"*{GT_SUFFIX}"))
    if not gt_files:
        raise MetricInputError(f"{gt_folder}: no *{GT_SUFFIX} files")
    predictions = _prediction_files(results_folder)
    missing = [p for p in gt_files if p.name[: -len(GT_SUFFIX)] not in predictions]
    if missing and not allow_missing:
        raise MetricInputError(f"{results_folder}: no prediction file for {len(missing)} "
                               f"ground-truth image(s), first {missing[0].name}")
    if progress:
        from instseg_pipeline.progress import progress as log_progress

        gt_files = log_progress(gt_files, desc="cityscapes AP", unit="image")
    return evaluate(match_files(p, predictions.get(p.name[: -len(GT_SUFFIX)]))
                    for p in gt_files)


# --- the canonical tables ---------------------------------------------------------------------

def _rles(counts: Iterable[str], size: list[int]) -> list[dict]:
    return [{"size": size, "counts": c} for c in counts]


def cityscapes_ap_from_tables(images, instances, categories, predictions,
                              image_ids: Sequence[int], gt_map=None,
                              min_region_size: int = MIN_REGION_SIZE,
                              progress: bool = False) -> dict:
    """Cityscapes AP of a predictions table (``image_id, category_id, score, rle``) on the
    images ``image_ids``.

    ``gt_map``: a function of an ``images`` row returning its gtFine instanceIds map; with it
    the ground truth, void and groups are the official ones and the classes are the 8
    evaluated Cityscapes label ids. Without it (any other source) the ground truth is the
    ``instances`` table: crowd rows act as group regions, there is no void, and the classes
    are the ``categories`` table's. ``"ground_truth"`` in the result says which.
    """
    from pycocotools import mask as mask_utils

    classes = CLASSES if gt_map is not None else dict(
        zip(categories["category_id"].astype(int), categories["name"].astype(str)))
    rows = images.set_index("image_id").loc[list(image_ids)].reset_index()
    gt_by_image = {k: g for k, g in instances.groupby("image_id")}
    pred_by_image = {k: g for k, g in predictions.groupby("image_id")}
    unknown = sorted(set(pred_by_image) - set(images["image_id"]))
    if unknown:
        raise MetricInputError(f"predictions for image ids not in the images table: "
                               f"{unknown[:10]}")
    empty = predictions.iloc[:0]
    iterator = rows.itertuples(index=False)
    if progress:
        from instseg_pipeline.progress import progress as log_progress

        iterator = log_progress(iterator, total=len(rows), desc="cityscapes AP", unit="image")
    matches = []
    for image in iterator:
        size = [int(image.height), int(image.width)]
        pred = pred_by_image.get(image.image_id, empty)
        where = f"image {image.image_id} ({image.file_name})"
        labels, scores = pred["category_id"].to_numpy(), pred["score"].to_numpy()
        if gt_map is not None:
            masks = mask_utils.decode(_rles(pred["rle"], size)).transpose(2, 0, 1) \
                if len(pred) else np.zeros((0, *size), bool)
            matches.append(match_id_map(gt_map(image), masks.astype(bool), labels, scores,
                                        where=where))
            continue
        gt = gt_by_image.get(image.image_id, instances.iloc[:0])
        matches.append(match_rles(_rles(gt["rle"], size), gt["category_id"].to_numpy(),
                                  gt["iscrowd"].astype(bool).to_numpy(),
                                  _rles(pred["rle"], size), labels, scores, classes,
                                  where=where))
    result = evaluate(matches, classes, min_region_size=min_region_size)
    return {**result, "ground_truth": "gtFine" if gt_map is not None else "tables"}
