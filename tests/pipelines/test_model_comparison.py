"""`kedro run --pipelines model_comparison` on a tiny project: two families at the same tiny
budget (maskrcnn_tiny and a torch-only test family), the table and the figure saved, each
model in its own MLflow run nested under the pipeline's run, and the default run without
the comparison."""
from __future__ import annotations

import logging
import math
import sqlite3
from pathlib import Path

import pytest
import torch
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from kedro_fixtures import TINY
from torch_only_family import NOTE, TORCH_ONLY, torch_only_family  # noqa: F401

from instseg_pipeline.comparison.compare import COLUMNS
from instseg_pipeline.data.tables import label_mapping
from instseg_pipeline.models import build_model

pytestmark = pytest.mark.slow

MODELS = ["maskrcnn_tiny", TORCH_ONLY]
PARAMS = {**TINY, "training": {**TINY["training"], "threads": 1, "max_iters": 2},
          "model_comparison": {"models": MODELS,
                               "speed": {"images": 2, "warmup": 1, "threads": 1}}}


def _run(project: Path, params: dict) -> tuple:
    bootstrap_project(project)
    with KedroSession.create(project_path=project, runtime_params=params) as session:
        session.run(pipeline_names=["ingestion", "model_comparison"])
        catalog = session.load_context().catalog
        return catalog.load("model_comparison"), catalog.load("categories")


def _runs(project: Path) -> dict[str, dict]:
    """name -> {id, parent, metrics} of every MLflow run in the project's store."""
    with sqlite3.connect(project / "mlflow.db") as db:
        runs = {uuid: {"name": name, "status": status, "metrics": {}, "parent": None}
                for uuid, name, status in db.execute("select run_uuid, name, status from runs")}
        for uuid, value in db.execute(
                "select run_uuid, value from tags where key = 'mlflow.parentRunId'"):
            runs[uuid]["parent"] = value
        for uuid, key, value in db.execute("select run_uuid, key, value from latest_metrics"):
            runs[uuid]["metrics"][key] = value
    return {run.pop("name"): {"id": uuid, **run} for uuid, run in runs.items()}


@pytest.mark.usefixtures("torch_only_family")
def test_comparison_table_plot_and_nested_mlflow_runs(kedro_project, monkeypatch, caplog):
    monkeypatch.chdir(kedro_project)
    monkeypatch.delenv("INSTSEG_MLFLOW", raising=False)
    with caplog.at_level(logging.INFO):
        table, categories = _run(kedro_project, PARAMS)

    assert list(table.columns) == COLUMNS and table["model"].tolist() == MODELS
    assert table["backbone"].tolist() == ["tiny", "tiny"]
    for column in ("mAP", "mAP_50", "mAP_75", "box_mAP"):
        assert table[column].between(0.0, 1.0).all(), column
    assert (table["fps"] > 0).all() and (table["train_seconds"] > 0).all()
    torch.manual_seed(0)
    counted = sum(p.numel() for p in build_model(
        {"name": "maskrcnn_tiny", "min_size": 96, "max_size": 128},
        len(label_mapping(categories)) + 1
    ).parameters())
    assert table["params"].tolist() == [counted, counted]  # the test family is the same net
    rows = table.set_index("model")
    assert math.isnan(rows.loc[TORCH_ONLY, "fps_onnx"]) and NOTE in rows.loc[TORCH_ONLY,
                                                                              "onnx_note"]
    assert any(NOTE in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    progress = [r.getMessage() for r in caplog.records if "images/s eager" in r.getMessage()]
    assert len(progress) == 2 and progress[0].startswith("maskrcnn_tiny: trained 2 iterations")
    reporting = kedro_project / "data/08_reporting/synthetic"
    assert list((reporting / "model_comparison.png").iterdir())
    assert list((reporting / "model_comparison.csv").iterdir())

    runs = _runs(kedro_project)
    parents = [r for r in runs.values() if r["parent"] is None]
    assert len(parents) == 1 and len(runs) == 3, runs.keys()
    for name in MODELS:
        child = runs[name]
        assert child["parent"] == parents[0]["id"] and child["status"] == "FINISHED"
        assert child["metrics"]["mAP"] == pytest.approx(rows.loc[name, "mAP"])
        assert child["metrics"]["params"] == counted and "train/loss" in child["metrics"]
    assert "fps_onnx" not in runs[TORCH_ONLY]["metrics"]  # NaN is not logged
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{kedro_project / 'mlflow.db'}")
    assert {"model_comparison.csv", "figures"} <= {
        a.path for a in client.list_artifacts(parents[0]["id"])}
    assert client.get_run(runs[TORCH_ONLY]["id"]).data.params["model.name"] == TORCH_ONLY


def test_the_default_run_leaves_the_comparison_out():
    from instseg_pipeline.pipeline_registry import register_pipelines

    pipelines = register_pipelines()
    assert "model_comparison" in pipelines
    assert "compare_models" not in {node.name for node in pipelines["__default__"].nodes}
    assert "model_comparison" in pipelines["model_comparison"].all_outputs()
