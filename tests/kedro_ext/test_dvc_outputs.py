"""The DVC copies of metrics and plot data: scores only, the PR curve at IoU 0.50 averaged
over the classes that have ground truth, files under data/08_reporting/<source>/dvc/."""
from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from instseg_pipeline.kedro_ext.dvc_outputs import DvcOutputsHook, metric_scores, pr_curve


def test_metric_scores_keep_the_nested_floats_only():
    report = {"segm": {"mAP": np.float64(0.25), "mAP_large": -1.0, "n": 3,
                       "per_class_ap": [{"name": "a", "ap": 0.5}]},
              "AP50": None, "AP": float("nan"), "ground_truth": "tables", "flag": True,
              "per_category": {"1": {"pq": 0.5}}, "ap_table": [[0.1]], "empty": {"n": 2}}
    assert metric_scores(report) == {"segm": {"mAP": 0.25, "mAP_large": -1.0}}
    assert type(metric_scores(report)["segm"]["mAP"]) is float


def _precision(per_class: list) -> np.ndarray:
    """precision [T=10, R=101, K, A=4, M=3] with class k's curve at IoU .50, area all, most
    detections; everything else 0.9 (a value the curve must not pick up)."""
    precision = np.full((10, 101, len(per_class), 4, 3), 0.9)
    for k, curve in enumerate(per_class):
        precision[0, :, k, 0, -1] = curve
    return precision


def test_pr_curve_averages_the_classes_with_ground_truth_at_iou_50():
    recall = np.linspace(0, 1, 101)
    precision = _precision([1 - recall, np.full(101, -1.0), np.full(101, 0.5)])
    curve = pr_curve({"segm": {"precision": precision}, "bbox": {"precision": precision * 0}})
    assert list(curve.columns) == ["recall", "precision"]
    np.testing.assert_allclose(curve["recall"], recall.round(4))
    np.testing.assert_allclose(curve["precision"], (1 - recall + 0.5) / 2)


def test_pr_curve_falls_back_to_boxes_and_is_none_without_any_class():
    recall = np.linspace(0, 1, 101)
    boxes = pr_curve({"bbox": {"precision": _precision([recall])}})
    np.testing.assert_allclose(boxes["precision"], recall)
    assert pr_curve({"segm": {"precision": _precision([np.full(101, -1.0)])}}) is None
    assert pr_curve({"segm": {"precision": np.zeros((2, 3))}}) is None
    assert pr_curve({}) is None


def _context(tmp_path, globals_: dict) -> SimpleNamespace:
    return SimpleNamespace(config_loader={"globals": globals_}, project_path=tmp_path)


def test_the_hook_writes_metrics_and_plot_data_under_the_source_folder(tmp_path):
    hook = DvcOutputsHook()
    hook.after_context_created(_context(tmp_path, {"source_name": "ci"}))
    hook.after_dataset_saved("coco_metrics", {"segm": {"mAP": 0.5, "per_class_ap": []}})
    history = pd.DataFrame({"iteration": [0, 1], "epoch": [0, 0], "loss": [2.0, 1.5],
                            "lr": [0.01, 0.02], "time": [0.1, 0.1]})
    hook.after_dataset_saved("training_history", history)
    hook.after_dataset_saved("coco_pr_arrays",
                             {"segm": {"precision": _precision([np.full(101, 0.5)])}})
    hook.after_dataset_saved("predictions", pd.DataFrame())  # not for DVC: ignored

    folder = tmp_path / "data/08_reporting/ci/dvc"
    assert sorted(p.name for p in folder.iterdir()) == [
        "coco_metrics.json", "learning_rate.csv", "pr_curve.csv", "training_loss.csv"]
    assert json.loads((folder / "coco_metrics.json").read_text()) == {"segm": {"mAP": 0.5}}
    assert (folder / "training_loss.csv").read_text().splitlines() == [
        "iteration,loss", "0,2.0", "1,1.5"]
    assert pd.read_csv(folder / "learning_rate.csv")["lr"].tolist() == [0.01, 0.02]
    assert len(pd.read_csv(folder / "pr_curve.csv")) == 101


def test_the_hook_writes_nothing_without_a_source_name(tmp_path, caplog):
    hook = DvcOutputsHook()
    with caplog.at_level(logging.WARNING):
        hook.after_context_created(_context(tmp_path, {}))
    assert "no source_name" in caplog.text
    hook.after_dataset_saved("coco_metrics", {"segm": {"mAP": 0.5}})
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("arrays", [{"segm": {"precision": _precision([np.full(101, -1.0)])}},
                                    {}])
def test_an_empty_pr_curve_replaces_the_last_one_when_no_class_has_a_curve(tmp_path, caplog,
                                                                           arrays):
    hook = DvcOutputsHook()
    hook.after_context_created(_context(tmp_path, {"source_name": "ci"}))
    path = tmp_path / "data/08_reporting/ci/dvc/pr_curve.csv"
    hook.after_dataset_saved("coco_pr_arrays",
                             {"segm": {"precision": _precision([np.full(101, 0.5)])}})
    with caplog.at_level(logging.WARNING):
        hook.after_dataset_saved("coco_pr_arrays", arrays)
    assert "pr_curve.csv has no rows" in caplog.text
    assert path.read_text().splitlines() == ["recall,precision"]
