"""ONNX export of a semantic family (Panoptic FPN): the graph's fifth output ``semantic``,
its parity with eager PyTorch, the stuff labels in the manifest, and the export pipeline.

The model is ``panoptic_fpn_tiny`` with an untrained (seeded) detector that still detects
(score threshold 0) and a semantic branch trained for a few steps on sky/ground scenes, so
that its map has decisive regions: an untrained branch's logits are all near zero and its
argmax would compare coin tosses.
"""
from __future__ import annotations

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from kedro_datasets.json import JSONDataset
from model_fixtures import one_thread, shapes_scene  # noqa: F401 (autouse)
from PIL import Image

from instseg_pipeline.export import manifest as onnx_manifest
from instseg_pipeline.export import onnx as onnx_export
from instseg_pipeline.export import parity as onnx_parity
from instseg_pipeline.kedro_ext.datasets import OnnxModelDataset
from instseg_pipeline.models import build_model, load_model, model_config
from instseg_pipeline.pipelines.export import create_pipeline
from instseg_pipeline.predict.backends import OnnxBackend, TorchBackend
from instseg_pipeline.predict.preprocess import to_chw, to_tensor

CLASSES = {1: "box", 2: "disc"}
STUFF_CLASSES = {1: "sky", 2: "ground"}
STUFF_CATEGORY_IDS = {1: 119, 2: 125}
MODEL_PARAMS = {"name": "panoptic_fpn_tiny", "min_size": 128, "max_size": 192,
                "box_score_thresh": 0.0, "box_detections_per_img": 10,
                "stuff_classes": len(STUFF_CLASSES)}
EXAMPLE_SIZE = (144, 176)
PARITY_SIZES = [(98, 131), (200, 150), (194, 96)]
SKY, GROUND = (90, 140, 230), (70, 120, 40)


def stuff_scene(rng: np.random.Generator, height: int, width: int
                ) -> tuple[np.ndarray, dict]:
    """`shapes_scene` over sky (label 1) above a random horizon and ground (2) below it;
    the target's ``semantic`` is 0 on the shapes."""
    image, target = shapes_scene(rng, height, width)
    horizon = int(rng.integers(height * 3 // 10, height * 7 // 10))
    semantic = np.full((height, width), 2, np.int64)
    semantic[:horizon] = 1
    things = target["masks"].numpy().any(0)
    background = ~things
    image[background & (semantic == 1)] = SKY
    image[background & (semantic == 2)] = GROUND
    semantic[things] = 0
    return image, {**target, "semantic": torch.from_numpy(semantic)}


def train_semantic_head(network, iterations: int, rng: np.random.Generator) -> None:
    """A few Adam steps on the semantic branch alone (everything else frozen); leaves the
    network in eval mode with every parameter trainable again."""
    head = list(network.semantic_head.parameters())
    for name, param in network.named_parameters():
        param.requires_grad_(name.startswith("semantic_head."))
    optimizer = torch.optim.Adam(head, lr=0.01)
    network.train()
    for _ in range(iterations):
        batch = [stuff_scene(rng, 112, 144) for _ in range(2)]
        losses = network([to_tensor(image) for image, _ in batch], [t for _, t in batch])
        optimizer.zero_grad()
        losses["loss_semantic"].backward()
        optimizer.step()
    for param in network.parameters():
        param.requires_grad_(True)
    network.eval()


@pytest.fixture(scope="module")
def trained() -> dict:
    """The model dict as training writes it for a semantic family."""
    torch.manual_seed(0)
    network = build_model(MODEL_PARAMS, len(CLASSES) + 1)
    train_semantic_head(network, 25, np.random.default_rng(0))
    return {"config": model_config(MODEL_PARAMS, len(CLASSES) + 1),
            "state_dict": network.state_dict(), "classes": CLASSES, "iterations": 25,
            "category_ids": {1: 18, 2: 44},
            "stuff_classes": STUFF_CLASSES, "stuff_category_ids": STUFF_CATEGORY_IDS}


@pytest.fixture(scope="module")
def network(trained):
    return load_model(trained["config"], trained["state_dict"]).eval()


@pytest.fixture(scope="module")
def exported(network, trained, tmp_path_factory):
    """(path to model.onnx, manifest) traced on a stuff scene of `EXAMPLE_SIZE`."""
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    example, _ = stuff_scene(np.random.default_rng(1), *EXAMPLE_SIZE)
    manifest = onnx_export.export_onnx(
        network, path, example=example, classes=CLASSES, config=trained["config"],
        stuff_classes=STUFF_CLASSES, stuff_category_ids=STUFF_CATEGORY_IDS, iterations=25)
    return path, manifest


def parity_images() -> tuple[list[np.ndarray], list]:
    rng = np.random.default_rng(2)
    images = [stuff_scene(rng, h, w)[0] for h, w in PARITY_SIZES]
    return onnx_parity.insert_blank(images, [f"scene{h}x{w}" for h, w in PARITY_SIZES])


def test_the_semantic_branch_learned_the_scenes(network):
    """The fixture's premise: its map follows sky, ground and shapes, not noise."""
    image, target = stuff_scene(np.random.default_rng(7), 120, 160)
    semantic = TorchBackend(network, "cpu")(to_chw(image))["semantic"]
    assert semantic.dtype == np.int64 and semantic.shape == (120, 160)
    assert (semantic == target["semantic"].numpy()).mean() > 0.8


def test_the_graph_returns_the_semantic_map_after_the_instances(exported):
    path, _ = exported
    session = onnx_export.create_session(path)
    names = [o.name for o in session.get_outputs()]
    assert names == ["boxes", "labels", "scores", "masks", "semantic"]
    image, _ = stuff_scene(np.random.default_rng(3), 150, 210)
    outputs = OnnxBackend(session)(to_chw(image))
    assert outputs["semantic"].dtype == np.int64 and outputs["semantic"].shape == (150, 210)
    assert set(np.unique(outputs["semantic"])) <= {0, 1, 2}
    assert len(outputs["scores"]) > 0


def test_the_manifest_names_the_stuff_labels_and_the_output(exported):
    path, manifest = exported
    assert manifest["stuff_classes"] == {"1": "sky", "2": "ground"}
    assert manifest["stuff_category_ids"] == {"1": 119, "2": 125}
    assert "semantic" in manifest["outputs"]
    read = onnx_manifest.read_manifest(onnx_manifest.manifest_path(path))
    assert read["stuff_classes"] == STUFF_CLASSES
    assert read["stuff_category_ids"] == STUFF_CATEGORY_IDS


def test_an_instance_model_manifest_has_no_stuff(tmp_path):
    manifest = onnx_manifest.torch_only_manifest("x", "a reason", {1: "a"}, {})
    assert "stuff_classes" not in manifest and "stuff_category_ids" not in manifest
    path = tmp_path / "m.manifest.json"
    onnx_manifest.write_manifest({**manifest, "sha256": "0", "stuff_classes": {"x": "sky"}},
                                 path)
    with pytest.raises(onnx_manifest.ManifestError, match="stuff_classes must map integer"):
        onnx_manifest.read_manifest(path)


def test_parity_compares_the_semantic_maps(network, exported):
    images, ids = parity_images()
    report = onnx_parity.check_parity(network, exported[0], images, image_ids=ids)
    assert report["passed"], [r["failures"] for r in report["per_image"]]
    limit = onnx_parity.DEFAULT_PARITY["semantic_agreement_min"]
    assert report["min_semantic_agreement"] >= limit
    assert all(r["semantic_agreement"] >= limit for r in report["per_image"])
    assert report["tolerances"]["semantic_agreement_min"] == limit


def _perturbed(path, name: str) -> bytes:
    """The model at ``path`` with initializer ``name``'s output channels reversed."""
    model = onnx.load(str(path))
    tensor = next(t for t in model.graph.initializer if t.name.endswith(name))
    values = onnx.numpy_helper.to_array(tensor)[::-1].copy()
    tensor.CopyFrom(onnx.numpy_helper.from_array(values, tensor.name))
    return model.SerializeToString()


def test_a_broken_semantic_branch_fails_parity(network, exported):
    images, ids = parity_images()
    broken = _perturbed(exported[0], "semantic_head.predictor.weight")
    report = onnx_parity.check_parity(network, broken, images[:1], image_ids=ids[:1])
    (record,) = report["per_image"]
    assert not record["passed"] and record["semantic_agreement"] < 0.9
    assert record["max_box_diff"] is not None  # the instances still agree
    with pytest.raises(onnx_parity.ParityError, match=r"semantic map agrees on 0\.\d+ of the "
                                                      r"pixels < semantic_agreement_min"):
        onnx_parity.raise_on_failure(report)


def _val_images(root) -> pd.DataFrame:
    rng = np.random.default_rng(4)
    rows = []
    for image_id, (h, w) in enumerate(PARITY_SIZES, start=1):
        Image.fromarray(stuff_scene(rng, h, w)[0]).save(root / f"{image_id}.png")
        rows.append({"image_id": image_id, "file_name": f"{image_id}.png", "width": w,
                     "height": h, "split": "val", "source": "test"})
    return pd.DataFrame(rows)


def test_export_pipeline_writes_the_label_maps_and_gates_the_semantic_map(trained, tmp_path):
    params = {"opset": 17, "parity": {"num_images": 3},
              "latency": {"num_images": 1, "threads": 1, "warmup": 1, "repeats": 1}}
    catalog = DataCatalog({"model": MemoryDataset(trained),
                           "images": MemoryDataset(_val_images(tmp_path)),
                           "params:source": MemoryDataset({"root": str(tmp_path)}),
                           "params:export": MemoryDataset(params),
                           "onnx_model": OnnxModelDataset(
                               filepath=str(tmp_path / "models" / "model.onnx")),
                           "parity_report": JSONDataset(filepath=str(tmp_path / "parity.json")),
                           "latency_report": JSONDataset(
                               filepath=str(tmp_path / "latency.json"))})
    SequentialRunner().run(create_pipeline(), catalog)
    manifest = catalog.load("onnx_model")["manifest"]
    assert {int(k): v for k, v in manifest["stuff_classes"].items()} == STUFF_CLASSES
    assert {int(k): v for k, v in manifest["stuff_category_ids"].items()} == \
        STUFF_CATEGORY_IDS
    assert manifest["category_ids"] == {"1": 18, "2": 44}
    parity = catalog.load("parity_report")
    assert parity["passed"] and parity["min_semantic_agreement"] >= 0.99
