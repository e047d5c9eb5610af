"""Metrics and plot data at fixed paths, for DVC.

The catalog versions every report under a timestamped folder
(``data/08_reporting/<source_name>/coco_metrics.json/<version>/...``), a path DVC cannot name
in ``dvc.yaml``. This hook writes a copy of what ``dvc metrics`` and ``dvc plots`` read to
``data/08_reporting/<source_name>/dvc/`` (unversioned, owned by DVC as stage outputs):

- ``coco_metrics.json``, ``pq_metrics.json``, ``cityscapes_metrics.json``: the scores of
  each report (its finite floats), nested as in the report (DVC shows them as
  ``segm.mAP``, ``all.pq``); counts and settings (integers), lists (per-class tables, AP
  tables) and ``per_*`` breakdowns are left out, so the tables of ``dvc metrics show`` and
  ``dvc exp show`` stay readable;
- ``training_loss.csv`` (iteration, loss) and ``learning_rate.csv`` (iteration, lr) from
  ``training_history``;
- ``pr_curve.csv`` (recall, precision): class-mean precision at IoU 0.50 over COCO's 101
  recall thresholds (area all, most detections), from ``coco_pr_arrays``; mask AP's curve,
  or box AP's when masks were not evaluated.
"""
from __future__ import annotations

import json
import logging
import math
from numbers import Integral, Real
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kedro.framework.hooks import hook_impl

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

METRICS = ("coco_metrics", "pq_metrics", "cityscapes_metrics")
HISTORY_PLOTS = {"training_loss": "loss", "learning_rate": "lr"}  # file -> history column


def dvc_folder(project_path: Path, source_name: str) -> Path:
    """The folder of the DVC copies of one source's reports."""
    return Path(project_path) / "data" / "08_reporting" / source_name / "dvc"


def metric_scores(report: Any) -> Any:
    """The finite floats of a report's nested dicts, in the same nesting; None when none.

    Integers (counts, settings), booleans, strings, None, lists and keys starting with
    ``per_`` are dropped.
    """
    if isinstance(report, dict):
        kept = {str(k): metric_scores(v) for k, v in report.items()
                if not str(k).startswith("per_")}
        kept = {k: v for k, v in kept.items() if v is not None}
        return kept or None
    if isinstance(report, Real) and not isinstance(report, Integral | bool):
        return float(report) if math.isfinite(report) else None
    return None


def history_curve(history: pd.DataFrame, column: str) -> pd.DataFrame:
    """``iteration`` and one column of the training history (one row per step)."""
    return history.loc[:, ["iteration", column]].reset_index(drop=True)


def pr_curve(arrays: dict) -> pd.DataFrame | None:
    """Class-mean precision vs recall at IoU 0.50 from COCOeval's accumulated arrays.

    arrays: ``{iou_type: {"precision": float [T, R, K, A, M], ...}}`` with -1 where a
    class has no ground truth; T = 0 is IoU 0.50, A = 0 area all, M = -1 most detections.
    Returns rows (recall, precision) at the R recall thresholds where some class has a
    value, None when no class has one.
    """
    import numpy as np

    iou_type = "segm" if "segm" in arrays else next(iter(arrays), None)
    precision = np.asarray((arrays.get(iou_type) or {}).get("precision", []), dtype=np.float64)
    if precision.ndim != 5 or precision.size == 0:
        return None
    curves = precision[0, :, :, 0, -1]  # [R, K]
    valid = curves > -1
    counts = valid.sum(axis=1)
    if not counts.any():
        return None
    means = np.where(valid, curves, 0.0).sum(axis=1) / np.maximum(counts, 1)
    recall = np.linspace(0.0, 1.0, curves.shape[0])  # COCO's recThrs
    keep = counts > 0
    return pr_curve_frame(recall[keep].round(4), means[keep])


def pr_curve_frame(recall=(), precision=()) -> pd.DataFrame:
    """The table of ``pr_curve.csv``: one row per recall threshold."""
    import pandas as pd

    return pd.DataFrame({"recall": list(recall), "precision": list(precision)})


class DvcOutputsHook:
    """Writes the metrics and plot data of a run where ``dvc.yaml`` declares them."""

    def __init__(self) -> None:
        self._folder: Path | None = None

    @hook_impl
    def after_context_created(self, context) -> None:
        source_name = (context.config_loader["globals"] or {}).get("source_name")
        self._folder = dvc_folder(context.project_path, source_name) if source_name else None
        if self._folder is None:
            logger.warning("globals.yml has no source_name: no DVC copies of metrics and "
                           "plots are written")

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, data: Any) -> None:
        if self._folder is None:
            return
        if dataset_name in METRICS:
            self._write_json(f"{dataset_name}.json", metric_scores(data) or {})
        elif dataset_name == "training_history":
            for name, column in HISTORY_PLOTS.items():
                if column in data.columns:
                    self._write_csv(f"{name}.csv", history_curve(data, column))
        elif dataset_name == "coco_pr_arrays":
            curve = pr_curve(data or {})
            if curve is None:  # still written: dvc.yaml declares it, and it must not be stale
                logger.warning("no class has a precision/recall curve: %s has no rows",
                               self._folder / "pr_curve.csv")
            self._write_csv("pr_curve.csv", curve if curve is not None else pr_curve_frame())

    def _write_json(self, name: str, data: dict) -> None:
        path = self._target(name)
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    def _write_csv(self, name: str, frame: pd.DataFrame) -> None:
        frame.to_csv(self._target(name), index=False)

    def _target(self, name: str) -> Path:
        self._folder.mkdir(parents=True, exist_ok=True)
        logger.debug("DVC copy: %s", self._folder / name)
        return self._folder / name
