"""The one-stage families go through the same engine and evaluation as Mask R-CNN: DDP with
two gloo workers, resume from a checkpoint, and the evaluation nodes (COCO AP, PQ,
Cityscapes AP) and the Predictor on what they trained. Tiny budgets: this proves the
plumbing, the overfit tests in tests/models prove the learning."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from overfit import ENGINE, overfit_tables
from process_fixtures import free_port

from instseg_pipeline.engine.config import TrainingConfig
from instseg_pipeline.engine.fit import fit
from instseg_pipeline.pipelines.evaluation.nodes import (
    compute_cityscapes_metrics,
    compute_coco_metrics,
    compute_pq_metrics,
    predict,
    predict_panoptic,
)
from instseg_pipeline.predict.predictor import Predictor

pytestmark = pytest.mark.slow

FAMILIES = ["yolact_tiny", "solov2_tiny", "simpleseg_tiny"]
MODEL = {"min_size": 96, "max_size": 128}


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    root = tmp_path_factory.mktemp("families_data")
    images, instances, categories = overfit_tables(root)
    # two train and two val images: evaluation has ground truth to score against
    images = images.assign(split=["train", "train", "val", "val"])
    return root, images, instances, categories


def _config(tmp_path, name: str, **overrides) -> TrainingConfig:
    return TrainingConfig.from_params({
        **ENGINE, "checkpoint_dir": str(tmp_path / "ckpt"), "max_iters": 2,
        "checkpoint_every": 1, "model": {"name": name, **MODEL},
        "optimizer": {"name": "adamw", "lr": 0.001}, **overrides})


@pytest.mark.parametrize("name", FAMILIES)
def test_ddp_two_workers_then_resume(tmp_path, tables, name):
    root, images, instances, categories = tables
    threads = torch.get_num_threads()
    try:
        ddp = _config(tmp_path, name, distributed={
            "nproc_per_node": 2, "rdzv_endpoint": f"127.0.0.1:{free_port()}",
            "timeout_s": 300})
        first = fit(images, instances, categories, str(root), ddp)
        assert first["model"]["iterations"] == 2 and first["model"]["config"]["name"] == name
        resumed = fit(images, instances, categories, str(root),
                      _config(tmp_path, name, max_iters=3, resume="auto"))
    finally:
        torch.set_num_threads(threads)
    assert resumed["model"]["iterations"] == 3
    # the resumed run continued the DDP run's history (two steps) with one more
    assert resumed["history"]["iteration"].nunique() == 3


@pytest.mark.parametrize("name", FAMILIES)
def test_evaluation_nodes_and_predictor_take_every_family(tmp_path, tables, name):
    root, images, instances, categories = tables
    threads = torch.get_num_threads()
    try:
        result = fit(images, instances, categories, str(root), _config(tmp_path, name))
    finally:
        torch.set_num_threads(threads)
    model = result["model"]
    source = {"type": "synthetic", "root": str(root)}
    # a near-zero cut: an untrained family must still hand predictions to every metric
    evaluation = {"score_threshold": 0.0, "batch_size": 1, "device": "cpu"}
    predictions = predict(model, images, categories, source, evaluation)
    assert {"image_id", "score", "rle", "category_id"} <= set(predictions.columns)
    coco, _ = compute_coco_metrics(images, instances, categories, predictions, evaluation)
    assert 0.0 <= coco["segm"]["mAP"] <= 1.0 and 0.0 <= coco["bbox"]["mAP"] <= 1.0
    panoptic = predict_panoptic(model, images, categories, predictions, source, evaluation)
    stuff = instances.iloc[:0]
    pq = compute_pq_metrics(images, instances, stuff, categories, panoptic, evaluation)
    assert {"all", "things"} <= set(pq) and pq["stuff"]["n"] == 0
    cityscapes = compute_cityscapes_metrics(images, instances, categories, predictions,
                                            source, evaluation)
    assert "AP" in cityscapes
    predictor = Predictor.from_model(model, device="cpu")
    image = np.zeros((100, 120, 3), np.uint8)
    found = predictor.predict(image, score_threshold=0.0)
    assert isinstance(found, list)
