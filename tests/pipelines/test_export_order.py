"""The default run exports after evaluation: a failing export (a model that finds nothing)
ends the run with the metrics and figures already saved, and a clear ExportError."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
from kedro.framework.project import pipelines
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from kedro_fixtures import REPO_ROOT, TINY

from instseg_pipeline.export.onnx import ExportError

EXPORT_NODES = {"await_evaluation", "export_model", "check_onnx_parity", "measure_latency"}
# a score no detection can beat (torchvision keeps scores > box_score_thresh): the model
# trains and is evaluated as usual, but finds nothing, so the export has no example to trace
BLIND = {**TINY, "training": {**TINY["training"], "model": {
    **TINY["training"]["model"], "box_score_thresh": 1.0}}}


def _registered(project: Path) -> dict:
    bootstrap_project(project)
    pipelines.set_requested(None)  # a session run before may have narrowed the registry
    return dict(pipelines.items())


def _order(pipeline) -> list[str]:
    return [node.name for node in pipeline.nodes]


def test_export_comes_after_every_evaluation_node():
    registered = _registered(REPO_ROOT)
    evaluation = {node.name for node in registered["evaluation"].nodes}
    order = _order(registered["__default__"])
    assert EXPORT_NODES <= set(order) and evaluation <= set(order)
    late = [node for node in evaluation if order.index(node) > order.index("export_model")]
    assert not late, f"__default__: {late} run after export_model"
    # `kedro run --pipelines export` alone exports the latest model: no evaluation needed
    assert "coco_metrics" not in registered["export"].inputs()
    assert EXPORT_NODES - {"await_evaluation"} == set(_order(registered["export"]))


@pytest.mark.slow
def test_a_failing_export_leaves_the_metrics_saved(kedro_project, monkeypatch, caplog):
    monkeypatch.chdir(kedro_project)
    monkeypatch.setenv("INSTSEG_MLFLOW", "off")
    bootstrap_project(kedro_project)
    caplog.set_level(logging.INFO, logger="instseg_pipeline.pipelines.export.nodes")
    with KedroSession.create(project_path=kedro_project, runtime_params=BLIND) as session:
        with pytest.raises(ExportError, match=r"none of the \d+ val images tried .* yields a "
                                              r"detection.*train longer"):
            session.run()  # __default__
        catalog = session.load_context().catalog
    assert "exporting after evaluation (metrics saved: segm mAP" in caplog.text
    metrics = catalog.load("coco_metrics")
    assert set(metrics) == {"segm", "bbox", "pixel"} and metrics["segm"]["mAP"] <= 0.0
    assert set(catalog.load("pq_metrics")) >= {"all", "things"}
    assert catalog.load("cityscapes_metrics")["ground_truth"] == "tables"
    assert catalog.load("predictions").empty
    reporting = kedro_project / "data/08_reporting/synthetic"
    for figure in ("visualisation_suite.png", "performance_dashboard.png",
                   "worst_and_best_images.png", "false_negative_gallery.png"):
        assert list((reporting / figure).iterdir()), f"{figure} was not saved before export"
    assert not catalog.exists("onnx_model") and not catalog.exists("parity_report")
