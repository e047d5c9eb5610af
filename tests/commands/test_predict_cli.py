"""`instseg-predict`: overlays and COCO results from image files and folders."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from model_fixtures import CLASSES, png_bytes, save_checkpoint, scene
from PIL import Image
from pycocotools.coco import COCO

from instseg_pipeline.commands import predict


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("model") / "model.pt")


@pytest.fixture
def folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for stem, seed in (("12", 0), ("34", 1), ("56", 2)):
        (images / f"{stem}.png").write_bytes(png_bytes(scene(96, 128, seed)))
    (images / "notes.txt").write_text("not an image, and not picked up")
    return images


def _coco_gt(images: list[dict]) -> COCO:
    gt = COCO()
    gt.dataset = {"images": [{k: i[k] for k in ("id", "width", "height")} for i in images],
                  "annotations": [], "categories": [{"id": k, "name": v}
                                                    for k, v in CLASSES.items()]}
    gt.createIndex()
    return gt


def test_folder_gives_overlays_and_coco_results(checkpoint, folder, tmp_path):
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "instseg_pipeline.commands.predict", str(folder),
         "--checkpoint", str(checkpoint), "--out", str(out), "--score-threshold", "0",
         "--device", "cpu", "--threads", "1"], check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["images"] == 3 and summary["failed"] == [] and summary["instances"] > 0
    images = json.loads((out / "images.json").read_text())
    assert sorted(i["id"] for i in images) == [12, 34, 56]  # digit stems become image ids
    results = json.loads((out / "predictions.json").read_text())
    assert {r["image_id"] for r in results} <= {12, 34, 56}
    assert {r["category_id"] for r in results} <= set(CLASSES)
    loaded = _coco_gt(images).loadRes(results)  # pycocotools accepts the results as they are
    assert len(loaded.anns) == len(results)
    for stem, seed in (("12", 0), ("34", 1), ("56", 2)):
        picture = np.asarray(Image.open(out / "overlays" / f"{stem}.png"))
        assert picture.shape == (96, 128, 3)
        assert not np.array_equal(picture, scene(96, 128, seed))  # masks drawn over it


def test_default_model_and_unreadable_files(checkpoint, tmp_path, monkeypatch, capsys):
    versioned = tmp_path / "data/06_models/synthetic/model.pt/2026-01-01T00.00.00.000Z"
    versioned.mkdir(parents=True)
    (versioned / "model.pt").write_bytes(checkpoint.read_bytes())
    good, bad = tmp_path / "photo.png", tmp_path / "text.jpg"
    good.write_bytes(png_bytes(scene(64, 80)))
    bad.write_text("this is text")
    monkeypatch.chdir(tmp_path)
    code = predict.main([str(good), str(bad), "--out", "out", "--score-threshold", "0.99",
                         "--device", "cpu"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 1 and summary["failed"] == [str(bad)] and summary["images"] == 1
    assert json.loads((tmp_path / "out/images.json").read_text())[0]["id"] == 1
    assert all(r["score"] >= 0.99 for r in json.loads(
        (tmp_path / "out/predictions.json").read_text()))
    assert (tmp_path / "out/overlays/photo.png").is_file()


def test_missing_model_or_input_exits_2(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.png").write_bytes(png_bytes(scene(32, 32)))
    assert predict.main(["a.png"]) == 2
    assert "no trained model found" in caplog.text
    assert predict.main(["missing.png", "--checkpoint", "x.pt"]) == 2
    assert "missing.png: no such image file or folder" in caplog.text


def test_predict_help_documents_every_option():
    out = subprocess.run([sys.executable, "-m", "instseg_pipeline.commands.predict", "--help"],
                         check=False, capture_output=True, text=True, timeout=60).stdout
    for option in ("IMAGE_OR_DIR", "--checkpoint", "--onnx", "--out", "--score-threshold",
                   "--mask-threshold", "--device"):
        assert option in out
