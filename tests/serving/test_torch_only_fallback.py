"""Serving a model whose family cannot be exported: asked for its ONNX model (the export
wrote a manifest saying ``exported: false`` and no graph), `load_predictor` and every entry
point on it (/segment's service, instseg-predict, the demo) serve the trained model with
torch and log why."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from model_fixtures import CLASSES, one_thread  # noqa: F401
from PIL import Image
from torch_only_family import NOTE, TORCH_ONLY, torch_only_family  # noqa: F401

from instseg_pipeline.export.manifest import (
    ManifestError,
    manifest_path,
    torch_only_manifest,
    write_manifest,
)
from instseg_pipeline.models import build_model, model_config
from instseg_pipeline.predict.predictor import ModelNotFoundError, load_predictor

PARAMS = {"name": TORCH_ONLY, "min_size": 96, "max_size": 128}


def _save_trained(root: Path, version: str, params: dict = PARAMS) -> Path:
    """A trained model where the training pipeline saves it (``model.pt/<version>/``)."""
    torch.manual_seed(0)
    network = build_model(params, len(CLASSES) + 1)
    path = root / "data/06_models/synthetic/model.pt" / version / "model.pt"
    path.parent.mkdir(parents=True)
    torch.save({"config": model_config(params, len(CLASSES) + 1),
                "state_dict": network.state_dict(), "classes": dict(CLASSES),
                "iterations": 3}, path)
    return path


def _torch_only_export(root: Path, version: str = "2026-01-01T00.00.01.000Z") -> Path:
    """Where the export pipeline puts model.onnx; only its manifest exists."""
    onnx = root / "data/06_models/synthetic/model.onnx" / version / "model.onnx"
    onnx.parent.mkdir(parents=True)
    write_manifest(torch_only_manifest(TORCH_ONLY, NOTE, CLASSES, {"name": TORCH_ONLY}),
                   manifest_path(onnx))
    return onnx


def _fallback_logged(caplog) -> bool:
    return any(r.levelno == logging.WARNING and TORCH_ONLY in r.getMessage()
               and NOTE in r.getMessage() and "torch backend" in r.getMessage()
               for r in caplog.records)


@pytest.mark.usefixtures("torch_only_family")
def test_onnx_of_a_torch_only_family_is_served_with_torch(tmp_path, caplog):
    checkpoint = _save_trained(tmp_path, "2026-01-01T00.00.00.000Z")
    onnx = _torch_only_export(tmp_path)
    with caplog.at_level(logging.WARNING):
        predictor = load_predictor(onnx=onnx, root=tmp_path, device="cpu")
    assert predictor.backend_name == "torch" and _fallback_logged(caplog)
    assert predictor.info()["source"] == str(checkpoint)
    assert predictor.info()["model_name"] == TORCH_ONLY
    image = np.random.default_rng(0).integers(0, 256, (96, 120, 3), dtype=np.uint8)
    direct = load_predictor(checkpoint=checkpoint, device="cpu")
    assert [i["score"] for i in predictor.predict(image, 0.0)] == \
        [i["score"] for i in direct.predict(image, 0.0)]


@pytest.mark.usefixtures("torch_only_family")
def test_the_manifest_may_be_named_explicitly(tmp_path, caplog):
    _save_trained(tmp_path, "2026-01-01T00.00.00.000Z")
    onnx = _torch_only_export(tmp_path)
    with caplog.at_level(logging.WARNING):
        predictor = load_predictor(onnx=tmp_path / "elsewhere.onnx",
                                   manifest=manifest_path(onnx), root=tmp_path, device="cpu")
    assert predictor.backend_name == "torch" and _fallback_logged(caplog)


@pytest.mark.usefixtures("torch_only_family")
def test_a_newest_model_of_another_family_is_refused(tmp_path):
    _save_trained(tmp_path, "2026-01-01T00.00.00.000Z",
                  {**PARAMS, "name": "maskrcnn_tiny"})
    with pytest.raises(ManifestError, match=rf"manifest is of a {TORCH_ONLY} model .* is a "
                                            r"maskrcnn_tiny; pass .* with --checkpoint"):
        load_predictor(onnx=_torch_only_export(tmp_path), root=tmp_path, device="cpu")


@pytest.mark.usefixtures("torch_only_family")
def test_without_a_trained_model_the_error_says_what_is_missing(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no trained model found"):
        load_predictor(onnx=_torch_only_export(tmp_path), root=tmp_path, device="cpu")


def test_a_missing_onnx_file_without_manifest_still_fails(tmp_path):
    _save_trained(tmp_path, "2026-01-01T00.00.00.000Z", {**PARAMS, "name": "maskrcnn_tiny"})
    with pytest.raises(ModelNotFoundError, match="model.onnx: ONNX file not found"):
        load_predictor(onnx=tmp_path / "model.onnx", root=tmp_path)


def test_an_exported_model_is_still_served_with_onnx_runtime(tmp_path):
    from model_fixtures import export_tiny_onnx, tiny_model_dict

    onnx = export_tiny_onnx(tiny_model_dict(), tmp_path / "model.onnx")
    assert load_predictor(onnx=onnx).backend_name == "onnxruntime"


@pytest.mark.usefixtures("torch_only_family")
def test_service_predict_command_and_demo_fall_back(tmp_path, monkeypatch, caplog):
    from instseg_pipeline.commands import demo, predict
    from instseg_pipeline.serving.api import ServiceSettings, load_service

    _save_trained(tmp_path, "2026-01-01T00.00.00.000Z")
    onnx = _torch_only_export(tmp_path)
    settings = ServiceSettings(onnx=str(onnx), root=str(tmp_path), device="cpu")
    with caplog.at_level(logging.WARNING):
        service = load_service(settings)
        service.executor.shutdown()
        assert service.model_info()["backend"] == "torch"
        assert demo._load(settings)[0].backend_name == "torch"
    assert _fallback_logged(caplog)

    monkeypatch.chdir(tmp_path)
    image = np.random.default_rng(1).integers(0, 256, (96, 120, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    assert predict.main(["a.png", "--onnx", str(onnx), "--out", "out", "--device", "cpu",
                         "--threads", "1"]) == 0
    assert json.loads((tmp_path / "out/images.json").read_text())[0]["file_name"] == "a.png"
