"""The performance dashboard on the error scene (see `error_scene`)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from error_scene import axis_with_title, saved_size
from matplotlib.figure import Figure

from instseg_pipeline.viz.dashboard import performance_dashboard


def _history():
    iterations = np.arange(60)
    history = pd.DataFrame({"iteration": iterations, "epoch": iterations // 20,
                            "loss": 2.0 * np.exp(-iterations / 30) + 0.1,
                            "loss_mask": np.exp(-iterations / 30), "lr": 0.01})
    val = pd.DataFrame({"epoch": [0, 1, 2], "iteration": [20, 40, 60],
                        "loss": [1.3, 0.9, 0.7]})
    return history, val


PQ = {"all": {"pq": 0.5, "sq": 0.8, "rq": 0.625, "n": 3},
      "things": {"pq": 0.45, "sq": 0.75, "rq": 0.6, "n": 2},
      "stuff": {"pq": 0.6, "sq": 0.9, "rq": 0.667, "n": 1}, "per_category": {}}


def _dashboard(d, history=None, val_history=None, pq_metrics=None):
    return performance_dashboard(d["metrics"], d["arrays"], d["matches"], history,
                                 val_history, d["categories"], d["predictions"],
                                 d["images"], d["instances"], d["root"],
                                 pq_metrics=pq_metrics)


def test_performance_dashboard_panels(data, tmp_path):
    history, val = _history()
    figure = _dashboard(data, history, val, PQ)
    assert isinstance(figure, Figure) and len(figure.axes) == 12  # 8 panels + 4 images
    per_class = axis_with_title(figure, "AP per class")
    labels = [t.get_text() for t in per_class.get_xticklabels()]
    assert sorted(labels) == ["circle", "square", "triangle"]
    pr = axis_with_title(figure, "precision–recall")
    legend = [t.get_text() for t in pr.get_legend().get_texts()]
    assert any(text.startswith("IoU .50 (AP") for text in legend) and len(legend) == 3
    histogram = axis_with_title(figure, "mask IoU of matched")
    assert sum(p.get_height() for p in histogram.patches) == len(data["matches"])
    confusion = axis_with_title(figure, "GT class vs predicted class")
    assert [t.get_text() for t in confusion.get_yticklabels()][-1] == "background"
    loss = axis_with_title(figure, "training curves")
    assert "validation loss" in [t.get_text() for t in loss.get_legend().get_texts()]
    assert saved_size(figure, tmp_path / "dashboard.png") > 10_000


def test_dashboard_ap_bars_carry_the_metric_values(data):
    figure = _dashboard(data)
    bars = axis_with_title(figure, "COCO AP")
    segm = [p.get_height() for p in bars.containers[0]]
    assert segm[0] == pytest.approx(data["metrics"]["segm"]["mAP"])
    assert segm[1] == pytest.approx(data["metrics"]["segm"]["mAP_50"])


def test_dashboard_without_any_prediction(empty, tmp_path):
    assert len(empty["matches"]) == 0
    figure = _dashboard(empty)
    figure.savefig(tmp_path / "dashboard.png", dpi=30)
    histogram = axis_with_title(figure, "mask IoU of matched")
    assert "no matched" in histogram.texts[0].get_text()
    assert len(figure.axes) == 12
    assert "no panoptic metrics" in axis_with_title(figure, "panoptic quality").texts[0].get_text()


def test_dashboard_panoptic_bars_per_group(data):
    figure = _dashboard(data, pq_metrics=PQ)
    panel = axis_with_title(figure, "panoptic quality")
    labels = [t.get_text() for t in panel.get_xticklabels()]
    assert labels == ["all\n(n=3)", "things\n(n=2)", "stuff\n(n=1)"]
    heights = {c.get_label(): [p.get_height() for p in c] for c in panel.containers}
    assert heights["PQ"] == pytest.approx([0.5, 0.45, 0.6])
    assert heights["RQ"] == pytest.approx([0.625, 0.6, 0.667])


def test_dashboard_stuff_of_an_instance_model_is_not_applicable(data):
    things_only = {**PQ, "stuff": {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}}
    panel = axis_with_title(_dashboard(data, pq_metrics=things_only), "panoptic quality")
    assert [p.get_height() for p in panel.containers[0]][2] == 0.0
    assert sum(t.get_text() == "n/a" for t in panel.texts) == 3  # PQ, SQ, RQ of stuff
