"""The few lines a ``kedro run`` ends with: its metrics, where it saved, its MLflow run.

`RunSummaryHook` watches the run (node outputs, saved datasets, the active MLflow run) and
logs the summary after the pipeline; `summary_lines` builds it from plain values.
"""
from __future__ import annotations

import logging
import textwrap
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from kedro.framework.hooks import hook_impl

from instseg_pipeline.kedro_ext import tracking

logger = logging.getLogger(__name__)

# the outputs whose numbers are the run's results
METRIC_OUTPUTS = ("coco_metrics", "pq_metrics", "cityscapes_metrics")
# the data layers whose saved files the summary names
MODEL_LAYER, OUTPUT_LAYER, REPORT_LAYER = "06_models", "07_model_output", "08_reporting"
WIDTH = 100  # of the wrapped list of report names


def _number(value: Any) -> str:
    return "n/a" if value is None or value == -1 else f"{float(value):.4f}"


def metric_parts(outputs: Mapping[str, Any]) -> list[str]:
    """``mask AP 0.1234 (AP50 ...)``-style strings of the metric outputs present."""
    parts = []
    coco = outputs.get("coco_metrics") or {}
    for iou_type, label in (("segm", "mask"), ("bbox", "box")):
        if iou_type in coco:
            stats = coco[iou_type]
            parts.append(f"{label} AP {_number(stats.get('mAP'))} "
                         f"(AP50 {_number(stats.get('mAP_50'))})")
    pixel = {k: v for k, v in (coco.get("pixel") or {}).items()
             if k in ("pixel_accuracy", "mean_mask_iou")}
    if pixel:
        parts.append(" ".join(f"{k.replace('_', ' ')} {_number(v)}" for k, v in pixel.items()))
    panoptic = (outputs.get("pq_metrics") or {}).get("all")
    if panoptic:
        parts.append(" ".join(f"{k.upper()} {_number(panoptic.get(k))}"
                              for k in ("pq", "sq", "rq")))
    cityscapes = outputs.get("cityscapes_metrics") or {}
    if "AP" in cityscapes:
        parts.append(f"cityscapes AP {_number(cityscapes['AP'])} "
                     f"(AP50 {_number(cityscapes.get('AP50'))})")
    return parts


def saved_path(dataset: Any) -> str | None:
    """Where a file dataset saved in this run: the versioned file for a versioned dataset."""
    filepath = getattr(dataset, "_filepath", None)
    if filepath is None:
        return None
    version = getattr(dataset, "_version", None)
    if version is not None and getattr(version, "save", None):
        return str(PurePosixPath(filepath) / version.save / PurePosixPath(filepath).name)
    return str(filepath)


def summary_lines(outputs: Mapping[str, Any], paths: Mapping[str, str],
                  run_id: str | None) -> list[str]:
    """The summary: metrics, the saved models and predictions (one line each), the reports
    (one line), the MLflow run. ``paths``: dataset name -> saved file; only those under a
    models, model output or reporting data layer are named."""
    lines = []
    parts = metric_parts(outputs)
    if parts:
        lines.append("metrics: " + " | ".join(parts))
    layers = {name: _layer(path) for name, path in paths.items()}
    lines += [f"{name}: {paths[name]}" for name in sorted(paths)
              if layers[name] in (MODEL_LAYER, OUTPUT_LAYER)]
    reports = sorted(paths[n] for n in paths if layers[n] == REPORT_LAYER)
    if reports:
        lines.append(f"reports ({len(reports)}):{_reports_line(reports)}")
    lines.append(f"MLflow run: {run_id}" if run_id else "MLflow run: none (tracking off)")
    return lines


def _layer(path: str) -> str | None:
    return next((part for part in PurePosixPath(path).parts
                 if part in (MODEL_LAYER, OUTPUT_LAYER, REPORT_LAYER)), None)


def _reports_line(paths: list[str]) -> str:
    """``<folder>/<name>/<version>/<name> for`` and the names (wrapped, indented) when the
    reports share a folder and a version (one run's saves do), else the paths, one a line."""
    pure = [PurePosixPath(p) for p in paths]
    folders = {p.parent.parent.parent for p in pure}
    versions = {p.parent.name for p in pure}
    if len(folders) == 1 and len(versions) == 1 and all(p.parent.parent.name == p.name
                                                         for p in pure):
        names = textwrap.fill(", ".join(p.name for p in pure), width=WIDTH,
                              initial_indent="    ", subsequent_indent="    ")
        return f" {folders.pop()}/<name>/{versions.pop()}/<name> for\n{names}"
    return "\n" + "\n".join(f"    {path}" for path in paths)


def _relative(path: str) -> str:
    """``path`` relative to the working directory when inside it (shorter to read)."""
    try:
        return str(PurePosixPath(path).relative_to(Path.cwd().as_posix()))
    except ValueError:
        return path


class RunSummaryHook:
    """Logs `summary_lines` at the end of every successful pipeline run."""

    def __init__(self):
        self._reset()

    def _reset(self) -> None:
        self.outputs: dict[str, Any] = {}
        self.saved: list[str] = []
        self.run_id: str | None = None

    @hook_impl
    def before_pipeline_run(self) -> None:
        self._reset()

    @hook_impl
    def after_node_run(self, outputs: dict[str, Any]) -> None:
        self.run_id = tracking.active_run_id() or self.run_id
        self.outputs.update({k: outputs[k] for k in METRIC_OUTPUTS if k in outputs})

    @hook_impl
    def after_dataset_saved(self, dataset_name: str) -> None:
        self.saved.append(dataset_name)

    @hook_impl
    def after_pipeline_run(self, catalog: Any) -> None:
        paths = {}
        for name in dict.fromkeys(self.saved):
            path = saved_path(catalog.get(name)) if hasattr(catalog, "get") else None
            if path is not None:
                paths[name] = _relative(path)
        lines = summary_lines(self.outputs, paths, self.run_id)
        logger.info("run summary\n  %s", "\n  ".join(lines))
