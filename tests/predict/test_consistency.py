"""One inference path: for the same val images and thresholds, the evaluation `predict` node,
`instseg-predict` (torch and --onnx, the real CLI) and `/segment` (a real server) give the
same instances.

The model is the tiny Mask R-CNN with its ROI heads trained for a few seconds on generated
shapes (`model_fixtures.train_heads`); the val images come in two sizes, interleaved, so the
node's batches of 4 would mix sizes if it did not batch by size.

``INSTSEG_CONSISTENCY_PROJECT=<project dir>`` runs the same checks on that project's latest
trained and exported model (`kedro run` outputs of the synthetic source) and its val images.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from model_fixtures import (
    one_thread,  # noqa: F401 (autouse)
    shapes_scene,
    train_heads,
)
from PIL import Image
from process_fixtures import running

from instseg_pipeline.data.masks import string_to_rle
from instseg_pipeline.export.onnx import export_onnx
from instseg_pipeline.export.parity import DEFAULT_PARITY, mask_iou
from instseg_pipeline.models import build_model, model_config
from instseg_pipeline.pipelines.evaluation.nodes import predict
from instseg_pipeline.predict.batch import predict_images

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_PARAMS = {"name": "maskrcnn_tiny", "min_size": 128, "max_size": 192}
CLASSES = {1: "box", 2: "disc"}
VAL_SIZES = [(128, 160), (112, 144), (128, 160), (112, 144), (128, 160)]
SCORE_THRESHOLD = 0.05  # the evaluation default (parameters_evaluation.yml)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict:
    """A trained-model dict and its files (checkpoint, ONNX + manifest), val images on disk
    (``<image_id>.png``, so instseg-predict uses the same ids) and their tables."""
    root = tmp_path_factory.mktemp("consistency")
    if os.environ.get("INSTSEG_CONSISTENCY_PROJECT"):
        return _trained_project(Path(os.environ["INSTSEG_CONSISTENCY_PROJECT"]), root)
    torch.manual_seed(0)
    network = build_model(MODEL_PARAMS, len(CLASSES) + 1)
    train_heads(network, 30, np.random.default_rng(0))
    model = {"config": model_config(MODEL_PARAMS, len(CLASSES) + 1),
             "state_dict": network.state_dict(), "classes": CLASSES, "iterations": 30}
    torch.save(model, root / "model.pt")
    rng = np.random.default_rng(7)
    (root / "images").mkdir()
    rows = []
    for image_id, (h, w) in enumerate(VAL_SIZES, start=1):
        Image.fromarray(shapes_scene(rng, h, w)[0]).save(root / "images" / f"{image_id}.png")
        rows.append({"image_id": image_id, "file_name": f"{image_id}.png", "width": w,
                     "height": h, "split": "val", "source": "test"})
    example = np.asarray(Image.open(root / "images" / "1.png"))
    export_onnx(network, root / "model.onnx", example=example, classes=CLASSES,
                config=model["config"], iterations=30)
    categories = pd.DataFrame({"category_id": [1, 2], "name": ["box", "disc"],
                               "supercategory": ["shape", "shape"], "isthing": [1, 1]})
    return {"root": root, "model": model, "images": pd.DataFrame(rows),
            "categories": categories}


def _latest(folder: Path, name: str) -> Path:
    """The newest Kedro version of ``folder/<version>/name``."""
    versions = sorted(folder.glob(f"*/{name}"))
    if not versions:
        pytest.fail(f"no {name} under {folder}: run `kedro run` (and the export) there first")
    return versions[-1]


def _trained_project(project_dir: Path, root: Path) -> dict:
    """The synthetic source's latest model, its ONNX export and val images of a project."""
    import shutil

    from instseg_pipeline.data.images import load_image

    models = project_dir / "data/06_models/synthetic"
    checkpoint = _latest(models / "model.pt", "model.pt")
    onnx = _latest(models / "model.onnx", "model.onnx")
    shutil.copy(checkpoint, root / "model.pt")
    shutil.copy(onnx, root / "model.onnx")
    shutil.copy(onnx.with_name("model.manifest.json"), root / "model.manifest.json")
    tables = project_dir / "data/03_primary/synthetic"
    images = pd.read_parquet(tables / "images.parquet")
    images = images[images["split"] == "val"].reset_index(drop=True)
    (root / "images").mkdir()
    for row in images.itertuples():  # decoded pixels, written losslessly under the id
        pixels, _ = load_image(project_dir / "data/01_raw/synthetic" / row.file_name,
                               expected_size=(row.width, row.height))
        Image.fromarray(pixels).save(root / "images" / f"{row.image_id}.png")
    images["file_name"] = [f"{i}.png" for i in images["image_id"]]
    return {"root": root, "model": torch.load(root / "model.pt", weights_only=True),
            "images": images, "categories": pd.read_parquet(tables / "categories.parquet")}


def _label_to_category(model: dict) -> dict[int, int]:
    """Model label -> dataset category id (identity where the model dict has no map)."""
    saved = model.get("category_ids") or {label: label for label in model["classes"]}
    return {int(k): int(v) for k, v in saved.items()}


def _evaluation_params() -> dict:
    """The evaluation block of conf/base, on CPU."""
    text = (REPO_ROOT / "conf/base/parameters_evaluation.yml").read_text(encoding="utf-8")
    return {**yaml.safe_load(text)["evaluation"], "device": "cpu"}


@pytest.fixture(scope="module")
def evaluation(project) -> dict[int, list[dict]]:
    """Instances per image id from the evaluation `predict` node (its predictions table)."""
    params = _evaluation_params()
    assert params["score_threshold"] == SCORE_THRESHOLD and params["batch_size"] > 1
    table = predict(project["model"], project["images"], project["categories"],
                    {"root": str(project["root"] / "images")}, params)
    found = defaultdict(list)
    for row in table.itertuples():
        found[row.image_id].append({"label": row.label, "score": row.score, "rle": row.rle,
                                    "bbox": list(row.bbox)})
    return found


def _cli(project, backend: list[str], out: Path) -> dict[int, list[dict]]:
    """Instances per image id from `instseg-predict` run as a subprocess (COCO json)."""
    run = subprocess.run(
        [sys.executable, "-m", "instseg_pipeline.commands.predict", str(project["root"] / "images"),
         *backend, "--out", str(out), "--score-threshold", str(SCORE_THRESHOLD),
         "--device", "cpu", "--threads", "1"],
        check=False, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    found = defaultdict(list)
    for result in json.loads((out / "predictions.json").read_text()):
        found[result["image_id"]].append({"label": result["category_id"],
                                          "score": result["score"], "bbox": result["bbox"],
                                          "rle": result["segmentation"]["counts"]})
    return found


@pytest.fixture(scope="module")
def served(project, tmp_path_factory) -> dict[int, list[dict]]:
    """Instances per image id from `/segment` of a real `instseg-serve` process."""
    folder = tmp_path_factory.mktemp("serve")
    env = {k: v for k, v in os.environ.items() if not k.startswith("INSTSEG_")}
    args = ["instseg_pipeline.commands.serve", "--host", "127.0.0.1", "--checkpoint",
            str(project["root"] / "model.pt"), "--device", "cpu", "--threads", "1",
            "--log-level", "warning"]
    found = {}
    with running(args, folder / "server.log", folder, env, "/health", "server") as url:
        for image_id in project["images"]["image_id"]:
            content = (project["root"] / "images" / f"{image_id}.png").read_bytes()
            response = httpx.post(f"{url}/segment", files={"file": ("x.png", content)},
                                  data={"score_threshold": str(SCORE_THRESHOLD)}, timeout=60)
            assert response.status_code == 200, response.text
            found[image_id] = response.json()["instances"]
    return {k: [{**i, "rle": i["rle"]["counts"]} for i in v] for k, v in found.items()}


def _assert_same(expected: dict, actual: dict, image_ids) -> None:
    """Same count, labels and RLE strings per image, in order; scores within 1e-4."""
    for image_id in image_ids:
        want, got = expected.get(image_id, []), actual.get(image_id, [])
        assert len(got) == len(want), f"image {image_id}"
        assert [i["label"] for i in got] == [i["label"] for i in want], f"image {image_id}"
        assert [i["rle"] for i in got] == [i["rle"] for i in want], f"image {image_id}"
        np.testing.assert_allclose([i["score"] for i in got], [i["score"] for i in want],
                                   atol=1e-4, err_msg=f"image {image_id}")


def test_evaluation_cli_and_api_give_the_same_instances(project, evaluation, served, tmp_path):
    ids = project["images"]["image_id"].tolist()
    assert sum(len(v) for v in evaluation.values()) >= len(ids)  # the model does detect
    _assert_same(evaluation, _cli(project, ["--checkpoint", str(project["root"] / "model.pt")],
                                  tmp_path / "torch"), ids)
    _assert_same(evaluation, served, ids)
    for image_id in ids:  # bbox is the mask's, as in the predictions table
        np.testing.assert_allclose([i["bbox"] for i in served.get(image_id, [])],
                                   [i["bbox"] for i in evaluation.get(image_id, [])])


def _decoded(counts: str, height: int, width: int) -> np.ndarray:
    from pycocotools import mask as mask_utils

    return mask_utils.decode(string_to_rle(counts, height, width)).astype(bool)


def test_onnx_cli_gives_the_same_instances_within_parity_tolerances(project, evaluation,
                                                                    tmp_path):
    """ONNX Runtime computes in another order, so scores and boxes get the parity gate's
    tolerances and masks a mask IoU (a border pixel may flip); counts must be equal."""
    onnx = _cli(project, ["--onnx", str(project["root"] / "model.onnx")], tmp_path / "onnx")
    for row in project["images"].itertuples():
        want, got = evaluation.get(row.image_id, []), onnx.get(row.image_id, [])
        assert len(got) == len(want), f"image {row.image_id}"
        assert [i["label"] for i in got] == [i["label"] for i in want]
        np.testing.assert_allclose([i["score"] for i in got], [i["score"] for i in want],
                                   atol=DEFAULT_PARITY["score_atol"])
        np.testing.assert_allclose([i["bbox"] for i in got], [i["bbox"] for i in want],
                                   atol=DEFAULT_PARITY["box_atol"])
        for a, b in zip(got, want):
            assert mask_iou(_decoded(a["rle"], row.height, row.width),
                            _decoded(b["rle"], row.height, row.width)) >= 0.99


def test_batches_of_one_size_give_each_image_what_it_gets_alone(project):
    """Batch prediction (evaluation, model selection) pads no image with a larger one's
    border, so the batch size does not change any image's instances."""
    from instseg_pipeline.models import load_model

    model = project["model"]
    network = load_model(model["config"], model["state_dict"])
    args = (project["images"], project["root"] / "images", _label_to_category(model))
    alone = predict_images(network, *args, batch_size=1, device="cpu")
    batched = predict_images(network, *args, batch_size=4, device="cpu")
    assert len(alone) > 0
    pd.testing.assert_frame_equal(alone.drop(columns="score"), batched.drop(columns="score"))
    np.testing.assert_allclose(alone["score"], batched["score"], atol=1e-6)
