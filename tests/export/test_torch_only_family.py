"""The export of a family that cannot be exported (``OnnxSpec(exportable=False)``): the
export pipeline warns, naming the family and the reason, writes a manifest and reports that
say ``exported: false`` and why, skips the ONNX parity and latency work, and the default
``kedro run`` completes."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from kedro.io import DataCatalog, DatasetError, MemoryDataset, Version
from kedro.runner import SequentialRunner
from kedro_datasets.json import JSONDataset
from kedro_fixtures import TINY
from model_fixtures import CLASSES, one_thread  # noqa: F401
from PIL import Image
from torch_only_family import NOTE, TORCH_ONLY, torch_only_family  # noqa: F401

from instseg_pipeline.export.manifest import torch_only_manifest
from instseg_pipeline.kedro_ext.datasets import OnnxModelDataset
from instseg_pipeline.models import build_model, model_config
from instseg_pipeline.pipelines.export import create_pipeline

OLDER = "2020-01-01T00.00.00.000Z"


def _trained() -> dict:
    params = {"name": TORCH_ONLY, "min_size": 96, "max_size": 128}
    torch.manual_seed(0)
    network = build_model(params, len(CLASSES) + 1)
    return {"config": model_config(params, len(CLASSES) + 1),
            "state_dict": network.state_dict(), "classes": dict(CLASSES), "iterations": 5}


def _val_images(root: Path) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for image_id, (h, w) in enumerate(((96, 120), (100, 90)), start=1):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            root / f"{image_id}.png")
        rows.append({"image_id": image_id, "file_name": f"{image_id}.png", "width": w,
                     "height": h, "split": "val", "source": "test"})
    return pd.DataFrame(rows)


def _older_exported_version(filepath: Path) -> None:
    """A graph an earlier run exported: the new run's manifest-only version must win."""
    data = b"an older graph"
    OnnxModelDataset(filepath=str(filepath), version=Version(None, OLDER)).save(
        {"onnx": data, "manifest": {"sha256": hashlib.sha256(data).hexdigest(),
                                    "classes": {}}})


@pytest.mark.usefixtures("torch_only_family")
def test_export_pipeline_reports_a_torch_only_family(tmp_path, caplog):
    filepath = tmp_path / "models" / "model.onnx"
    _older_exported_version(filepath)
    catalog = DataCatalog({
        "model": MemoryDataset(_trained()), "images": MemoryDataset(_val_images(tmp_path)),
        "params:source": MemoryDataset({"root": str(tmp_path)}),
        "params:export": MemoryDataset({}),
        "onnx_model": OnnxModelDataset(filepath=str(filepath), version=Version(None, None)),
        "parity_report": JSONDataset(filepath=str(tmp_path / "parity.json")),
        "latency_report": JSONDataset(filepath=str(tmp_path / "latency.json"))})
    with caplog.at_level(logging.INFO):
        SequentialRunner().run(create_pipeline(), catalog)

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(TORCH_ONLY in m and NOTE in m and "not exportable" in m for m in warnings)
    exported = catalog.load("onnx_model")
    assert exported["onnx"] is None
    manifest = exported["manifest"]
    assert manifest["exported"] is False and manifest["reason"] == NOTE
    assert manifest["family"] == TORCH_ONLY and manifest["iterations"] == 5
    assert manifest["classes"] == {str(k): v for k, v in CLASSES.items()}
    versions = sorted(p.name for p in filepath.iterdir())
    assert len(versions) == 2 and versions[0] == OLDER
    assert [p.name for p in (filepath / versions[1]).iterdir()] == ["model.manifest.json"]
    for name, status in (("parity_report", "passed"), ("latency_report", "parity_passed")):
        report = catalog.load(name)
        assert report["exported"] is False and report["skipped"] is True, name
        assert NOTE in report["reason"] and report["family"] == TORCH_ONLY
        assert report[status] is None


def test_a_graph_less_save_must_say_it_is_not_exported(tmp_path):
    dataset = OnnxModelDataset(filepath=str(tmp_path / "model.onnx"))
    with pytest.raises(DatasetError, match=r'does not say the model is not exported'):
        dataset.save({"onnx": None, "manifest": {"classes": {}}})
    dataset.save({"onnx": None,
                  "manifest": torch_only_manifest(TORCH_ONLY, NOTE, CLASSES, {})})
    assert dataset.exists() and dataset.load()["onnx"] is None


@pytest.mark.slow
@pytest.mark.usefixtures("torch_only_family")
def test_default_run_completes_for_a_torch_only_family(kedro_project, monkeypatch, caplog):
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    monkeypatch.chdir(kedro_project)
    monkeypatch.setenv("INSTSEG_MLFLOW", "off")
    training = {**TINY["training"], "max_iters": 2, "threads": 1,
                "model": {**TINY["training"]["model"], "name": TORCH_ONLY}}
    bootstrap_project(kedro_project)
    with caplog.at_level(logging.WARNING), KedroSession.create(
            project_path=kedro_project, runtime_params={**TINY, "training": training}) as session:
        session.run()
        catalog = session.load_context().catalog
        exported, latency = catalog.load("onnx_model"), catalog.load("latency_report")
    assert exported["onnx"] is None and exported["manifest"]["family"] == TORCH_ONLY
    assert latency["exported"] is False and NOTE in latency["reason"]
    assert catalog.load("coco_metrics")["segm"]["mAP"] >= 0.0
    assert any(TORCH_ONLY in r.getMessage() and NOTE in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)
