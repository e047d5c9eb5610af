"""The default chain as users run it (tiny sizes): KedroSession with a real MLflow store,
tracking switched off, and the `kedro run --pipeline training` command-line contract."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from kedro_fixtures import TINY

pytestmark = pytest.mark.slow

TINY_CLI = ("source.synthetic.num_images=14,source.synthetic.min_size=96,"
            "source.synthetic.max_size=128,training.batch_size=2,training.warmup_iters=2,"
            "training.val_max_images=2,training.preview_samples=2,"
            "training.model.min_size=96,training.model.max_size=128")


def _run(project: Path, pipelines: list[str], params: dict = TINY) -> dict:
    bootstrap_project(project)
    with KedroSession.create(project_path=project, runtime_params=params) as session:
        session.run(pipeline_names=pipelines)
        catalog = session.load_context().catalog
        return {name: catalog.load(name) for name in
                ("images", "model", "training_history", "coco_metrics", "pq_metrics",
                 "cityscapes_metrics", "predictions")}


def _mlflow_runs(project: Path) -> list[tuple]:
    with sqlite3.connect(project / "mlflow.db") as db:
        return db.execute("select run_uuid, name, status from runs").fetchall()


def test_default_chain_writes_every_output_and_tracks_in_mlflow(kedro_project, monkeypatch):
    monkeypatch.chdir(kedro_project)
    monkeypatch.delenv("INSTSEG_MLFLOW", raising=False)
    out = _run(kedro_project, ["ingestion", "training", "evaluation"])
    assert set(out["images"]["split"]) == {"train", "val"}
    assert {"config", "state_dict", "classes"} <= set(out["model"])
    assert out["model"]["config"]["name"] == "maskrcnn_tiny"
    selection = out["model"]["selection"]  # the final weights are evaluated too
    assert selection["metric"] == "segm/mAP" and selection["iteration"] == 4
    assert len(selection["history"]) == 1 and 0.0 <= selection["value"] <= 1.0
    history = out["training_history"]
    assert {"iteration", "loss", "lr"} <= set(history.columns) and len(history) == 4
    assert set(out["coco_metrics"]) == {"segm", "bbox", "pixel"}
    assert 0.0 <= out["coco_metrics"]["pixel"]["pixel_accuracy"] <= 1.0
    assert out["cityscapes_metrics"]["ground_truth"] == "tables"
    assert all(0.0 <= out["cityscapes_metrics"][k] <= 1.0 for k in ("AP", "AP50"))
    assert len([k for k in out["coco_metrics"]["segm"] if k.startswith(("mAP", "AR_"))]) == 12
    assert set(out["pq_metrics"]) >= {"all", "things", "stuff"}
    reporting = kedro_project / "data/08_reporting/synthetic"
    for figure in ("augmentation_preview.png", "training_curves.png", "dataset_statistics.png",
                   "visualisation_suite.png", "performance_dashboard.png",
                   "worst_and_best_images.png", "false_positive_gallery.png",
                   "false_negative_gallery.png", "panoptic_overlay.png"):
        assert list((reporting / figure).iterdir()), figure

    runs = _mlflow_runs(kedro_project)
    assert len(runs) == 1 and runs[0][2] == "FINISHED"
    with sqlite3.connect(kedro_project / "mlflow.db") as db:
        keys = {k for (k,) in db.execute("select distinct key from metrics")}
        params = {k for (k,) in db.execute("select key from params")}
    assert {"train/loss", "train/lr", "segm/mAP", "bbox/mAP", "cityscapes/AP",
            "pixel/pixel_accuracy", "pixel/mean_mask_iou", "pq/all", "pq/things"} <= keys
    assert "training.max_iters" in params
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{kedro_project / 'mlflow.db'}")
    artifacts = {a.path for a in client.list_artifacts(runs[0][0], "figures")}
    assert {"figures/training_curves.png", "figures/performance_dashboard.png"} <= artifacts
    assert client.search_logged_models(experiment_ids=[
        client.get_run(runs[0][0]).info.experiment_id]), "the model was not logged"


def test_tracking_can_be_switched_off(kedro_project, monkeypatch):
    monkeypatch.chdir(kedro_project)
    monkeypatch.setenv("INSTSEG_MLFLOW", "off")
    out = _run(kedro_project, ["ingestion", "training", "evaluation"])
    assert len(out["training_history"]) == 4
    db = kedro_project / "mlflow.db"
    assert not db.exists() or _mlflow_runs(kedro_project) == []


def test_cli_contract_resume_auto_continues_from_the_last_checkpoint(kedro_project):
    kedro = str(Path(sys.executable).with_name("kedro"))
    env = {**os.environ, "INSTSEG_MLFLOW": "off", "COLUMNS": "200"}

    def run(pipeline: str, params: str) -> subprocess.CompletedProcess:
        return subprocess.run([kedro, "run", "--pipeline", pipeline, "--params", params],
                              cwd=kedro_project, env=env, capture_output=True, text=True, check=False,
                              timeout=600)

    first = run("ingestion", TINY_CLI)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    first = run("training", TINY_CLI + ",training.max_iters=4,training.checkpoint_every=2,"
                "training.resume=none")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    checkpoints = sorted((kedro_project / "data/06_models/checkpoints/synthetic").glob("*.pt"))
    assert [p.name for p in checkpoints][-1] == "ckpt_00000004.pt"
    second = run("training", TINY_CLI + ",training.max_iters=6,training.checkpoint_every=2,"
                 "training.resume=auto")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resum" in (second.stdout + second.stderr).lower()
    versions = sorted((kedro_project / "data/08_reporting/synthetic/training_history.parquet")
                      .iterdir())
    latest = pd.read_parquet(versions[-1] / "training_history.parquet")
    assert latest["iteration"].max() == 5 and latest["iteration"].min() == 0
