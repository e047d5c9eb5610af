"""Ingestion as users run it: pipeline slice in memory, KedroSession, and the CLI."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from coco_fixtures import make_coco, write_json
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from instseg_pipeline.data.quality import IngestionError
from instseg_pipeline.pipelines.ingestion import create_pipeline

REPO = Path(__file__).resolve().parents[2]


def test_ingestion_slice_on_memory_catalog(tmp_path):
    make_coco(tmp_path, n_images=6)
    source = {"type": "coco", "root": str(tmp_path), "annotations": "annotations.json",
              "images": "images"}
    catalog = DataCatalog({"params:source": MemoryDataset(source),
                           "params:ingestion": MemoryDataset({"val_fraction": 0.5})})
    # Free outputs of a slice stay in the catalog; intermediate ones are released.
    SequentialRunner().run(create_pipeline().only_nodes("ingest_source", "split_images"),
                           catalog)
    images = catalog.load("images")
    assert set(images["split"]) == {"train", "val"} and len(images) == 6
    assert catalog.load("data_quality_report")["crowd_instances"] == 1
    SequentialRunner().run(create_pipeline().only_nodes("simulate_box_only",
                                                        "compute_dataset_statistics"), catalog)
    stats = catalog.load("dataset_statistics")
    assert sum(s["images"] for s in stats.values()) == 6
    assert sum(s["crowd_regions"] for s in stats.values()) == 1


def _run_session(project: Path, root: Path, **params):
    bootstrap_project(project)
    runtime = {"source": {"root": str(root), "annotations": "annotations.json",
                          "images": "images", **params}}
    with KedroSession.create(project_path=project, env="coco",
                             runtime_params=runtime) as session:
        session.run(pipeline_names=["ingestion"])


def test_session_run_writes_tables_and_a_failed_run_overwrites_nothing(
        tmp_path, kedro_project, monkeypatch):
    raw = tmp_path / "raw"
    data = make_coco(raw, n_images=5)
    monkeypatch.chdir(kedro_project)
    _run_session(kedro_project, raw)
    primary = kedro_project / "data/03_primary/coco"
    images = pd.read_parquet(primary / "images.parquet")
    assert sorted(images["image_id"]) == [1, 2, 3, 4, 5]
    assert list((kedro_project / "data/08_reporting/coco/data_quality_report.json").iterdir())
    before = {p.name: p.read_bytes() for p in primary.iterdir()}

    data["annotations"][0]["segmentation"] = [[1, 1, 2, 2]]
    write_json(raw, data)
    with pytest.raises(IngestionError, match="annotation 100"):
        _run_session(kedro_project, raw, on_invalid="fail")
    assert {p.name: p.read_bytes() for p in primary.iterdir()} == before


def test_kedro_cli_exits_non_zero_with_the_reason(tmp_path, kedro_project):
    data = make_coco(tmp_path)
    data["annotations"].append(dict(data["annotations"][0]))
    write_json(tmp_path, data)
    kedro = Path(sys.executable).with_name("kedro")
    result = subprocess.run(
        [str(kedro), "run", "--pipeline", "ingestion", "--env", "coco", "--params",
         f"source.root={tmp_path},source.annotations=annotations.json,source.images=images"],
        cwd=kedro_project, check=False, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"},
        timeout=300)
    assert result.returncode != 0
    assert "duplicate annotation ids 100" in result.stdout + result.stderr
