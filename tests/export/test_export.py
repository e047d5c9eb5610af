"""ONNX export: parity with eager PyTorch (sizes, the no-detection trap), a broken graph
caught, manifest digests, latency report, and the export pipeline on an in-memory catalog.

The model is the tiny Mask R-CNN with its ROI heads trained for a few dozen iterations on
generated shapes (`model_fixtures.train_heads`).
"""
from __future__ import annotations

import hashlib
import json
import warnings

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from kedro.io import DataCatalog, DatasetError, MemoryDataset
from kedro.runner import SequentialRunner
from kedro_datasets.json import JSONDataset
from model_fixtures import (
    one_thread,  # noqa: F401 (autouse)
    shapes_scene,
    train_heads,
)
from PIL import Image

from instseg_pipeline.export import latency as onnx_latency
from instseg_pipeline.export import manifest as onnx_manifest
from instseg_pipeline.export import onnx as onnx_export
from instseg_pipeline.export import parity as onnx_parity
from instseg_pipeline.kedro_ext.datasets import OnnxModelDataset
from instseg_pipeline.models import build_model, load_model, model_config
from instseg_pipeline.models.maskrcnn import eager_exact_resize
from instseg_pipeline.pipelines.export import create_pipeline
from instseg_pipeline.predict.backends import OnnxBackend, TorchBackend
from instseg_pipeline.predict.preprocess import to_chw

MODEL_PARAMS = {"name": "maskrcnn_tiny", "min_size": 128, "max_size": 192}
CLASSES = {1: "box", 2: "disc"}
EXAMPLE_SIZE = (144, 176)
# none is the example's size; at 98x131 and 194x96 torchvision's traced (float32) resize
# lands a pixel away from eager's (see models.maskrcnn.eager_exact_resize)
PARITY_SIZES = [(98, 131), (200, 150), (194, 96)]
RESIZE_TRAPS = [(98, 131), (194, 96), (97, 103), (103, 103), (96, 173)]


@pytest.fixture(scope="module")
def trained() -> dict:
    """A trained-model dict as the training pipeline writes it."""
    torch.manual_seed(0)
    network = build_model(MODEL_PARAMS, len(CLASSES) + 1)
    train_heads(network, 30, np.random.default_rng(0))
    return {"config": model_config(MODEL_PARAMS, len(CLASSES) + 1),
            "state_dict": network.state_dict(), "classes": CLASSES, "iterations": 30}


@pytest.fixture(scope="module")
def network(trained):
    return load_model(trained["config"], trained["state_dict"]).eval()


@pytest.fixture(scope="module")
def exported(network, trained, tmp_path_factory):
    """(path to model.onnx, manifest) traced on a scene of `EXAMPLE_SIZE`."""
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    example, _ = shapes_scene(np.random.default_rng(1), *EXAMPLE_SIZE)
    manifest = onnx_export.export_onnx(network, path, example=example, classes=CLASSES,
                                       config=trained["config"], iterations=30)
    return path, manifest


def parity_images() -> tuple[list[np.ndarray], list]:
    """Scenes of three sizes with a blank image after the first."""
    rng = np.random.default_rng(2)
    images = [shapes_scene(rng, h, w)[0] for h, w in PARITY_SIZES]
    return onnx_parity.insert_blank(images, [f"scene{h}x{w}" for h, w in PARITY_SIZES])


def test_parity_passes_on_three_sizes_and_a_blank_image(network, exported):
    images, ids = parity_images()
    assert ids[1] == onnx_parity.BLANK_ID
    report = onnx_parity.check_parity(network, exported[0], images, image_ids=ids)
    records = {r["image_id"]: r for r in report["per_image"]}
    assert report["passed"], [r["failures"] for r in report["per_image"]]
    assert report["no_detection_case_covered"]
    assert records["blank"]["eager_detections"] == records["blank"]["onnx_detections"] == 0
    for image_id in ids[:1] + ids[2:]:
        assert records[image_id]["matched"] == records[image_id]["eager_detections"] > 0
    assert report["max_box_diff"] <= onnx_parity.DEFAULT_PARITY["box_atol"]
    assert report["min_mask_iou"] >= onnx_parity.DEFAULT_PARITY["mask_iou_min"]
    assert [r["height"] for r in report["per_image"]] == [98, 98, 200, 194]


class _ResizeOnly(torch.nn.Module):
    """The detector's resize step alone: float32 [3, H, W] -> [3, h, w]."""

    def __init__(self, transform):
        super().__init__()
        self.transform = transform

    def forward(self, image):
        return self.transform.resize(image)[0]


def _resized_shapes(module, sizes, path) -> list[tuple]:
    """Output sizes of ``module`` exported to ONNX, run on inputs of ``sizes``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and exporter deprecation notices
        _export_resize(module, path)
    session = onnx_export.create_session(path)
    return [session.run(None, {"x": np.random.rand(3, *s).astype(np.float32)})[0].shape[1:]
            for s in sizes]


def _export_resize(module, path) -> None:
    torch.onnx.export(module, (torch.rand(3, *EXAMPLE_SIZE),), str(path), dynamo=False,
                      opset_version=17, input_names=["x"], dynamic_axes={"x": {1: "h", 2: "w"}})


def test_graph_resizes_to_eager_sizes_where_torchvision_trace_does_not(network, tmp_path):
    module = _ResizeOnly(network.transform)
    eager = [tuple(module(torch.rand(3, *s)).shape[1:]) for s in RESIZE_TRAPS]
    plain = _resized_shapes(module, RESIZE_TRAPS, tmp_path / "plain.onnx")
    assert all(p != e for p, e in zip(plain, eager)), (plain, eager)
    with eager_exact_resize(module):
        exact = [tuple(module(torch.rand(3, *s)).shape[1:]) for s in RESIZE_TRAPS]
        assert exact == eager
        assert _resized_shapes(module, RESIZE_TRAPS, tmp_path / "exact.onnx") == eager
    x = torch.rand(3, 98, 131)
    with eager_exact_resize(module):
        patched = module(x)
    assert torch.equal(patched, module(x))  # eager values untouched, method restored


def test_parity_gate_catches_the_float32_resize(network, tmp_path):
    example, _ = shapes_scene(np.random.default_rng(1), *EXAMPLE_SIZE)
    path = tmp_path / "plain.onnx"
    onnx_export.export_onnx(network, path, example=example, exact_resize=False)
    images, ids = parity_images()
    report = onnx_parity.check_parity(network, path, images[:1], image_ids=ids[:1])
    failures = report["per_image"][0]["failures"]
    assert not report["passed"] and failures, report


def test_a_run_without_detections_leaves_the_session_fit_for_the_next(network, exported):
    session = onnx_export.create_session(exported[0])
    # one image per run: no batch axis (a traced Mask R-CNN fixes the image count)
    assert session.get_inputs()[0].shape == [3, "height", "width"]
    image, _ = shapes_scene(np.random.default_rng(3), 176, 208)
    blank = to_chw(onnx_parity.blank_image(96, 128))
    assert len(session.run(None, {onnx_manifest.INPUT_NAME: blank})[0]) == 0
    onnx_out = OnnxBackend(session)(to_chw(image))
    eager = TorchBackend(network, "cpu")(to_chw(image))
    assert len(onnx_out["scores"]) == len(eager["scores"]) > 0
    assert onnx_out["masks"].shape[2:] == (176, 208)
    np.testing.assert_allclose(onnx_out["scores"], eager["scores"], atol=1e-3)


def test_export_refuses_an_example_without_detections(network, tmp_path):
    with pytest.raises(onnx_export.ExportError, match="no detections"):
        onnx_export.export_onnx(network, tmp_path / "m.onnx",
                                example=onnx_parity.blank_image(96, 96))
    assert not (tmp_path / "m.onnx").exists()


def _perturbed(path, name: str, scale: float) -> bytes:
    """The model at ``path`` with initializer ``name`` multiplied by ``scale``."""
    model = onnx.load(str(path))
    tensor = next(t for t in model.graph.initializer if t.name.endswith(name))
    values = onnx.numpy_helper.to_array(tensor) * np.float32(scale)
    tensor.CopyFrom(onnx.numpy_helper.from_array(values, tensor.name))
    return model.SerializeToString()


def test_a_broken_graph_fails_parity_naming_the_image(network, exported):
    images, ids = parity_images()
    broken = _perturbed(exported[0], "box_predictor.bbox_pred.weight", 4.0)
    report = onnx_parity.check_parity(network, broken, images, image_ids=ids)
    assert not report["passed"]
    failed = [r for r in report["per_image"] if not r["passed"]]
    assert failed and all(r["image_id"] != onnx_parity.BLANK_ID for r in failed)
    with pytest.raises(onnx_parity.ParityError, match=rf"image {failed[0]['image_id']} .*box"):
        onnx_parity.raise_on_failure(report)


def test_differences_on_a_flat_image_are_reported_not_gated(trained, exported):
    """On one colour the RPN's scores tie and the backends break ties differently, so a
    flat image gates only that onnxruntime runs; any other image stays gated."""
    eager = load_model(trained["config"], trained["state_dict"]).eval()
    eager.roi_heads.score_thresh = 0.0  # eager now keeps what the graph (0.05) drops
    flat = onnx_parity.blank_image(112, 144)
    speck = flat.copy()
    speck[50, 60] = 1
    report = onnx_parity.check_parity(eager, exported[0], [flat, speck],
                                      image_ids=["flat", "speck"])
    flat_record, speck_record = report["per_image"]
    assert flat_record["eager_detections"] > flat_record["onnx_detections"]
    assert flat_record["passed"] and flat_record["notes"] and "tied" in flat_record["ungated"]
    assert not speck_record["passed"] and speck_record["failures"]
    assert not report["passed"] and not report["no_detection_case_covered"]


def test_a_flat_image_still_fails_when_onnxruntime_fails():
    record = {"image_id": "blank", "eager_detections": 3, "passed": False,
              "failures": ["onnx masks have shape (1, 5, 5), eager (1, 6, 6)",
                           "2 eager detection(s) without a partner and not at a cut"]}
    ungated = onnx_parity.ungate_flat(record)
    assert not ungated["passed"] and ungated["failures"] == record["failures"][:1]
    assert onnx_parity.is_flat(onnx_parity.blank_image(4, 5)) and not onnx_parity.is_flat(
        np.arange(60, dtype=np.uint8).reshape(4, 5, 3))


def test_manifest_records_the_file_and_a_tampered_file_is_refused(exported, tmp_path):
    path, manifest = exported
    assert manifest["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert json.loads(onnx_manifest.manifest_path(path).read_text()) == manifest
    assert onnx_manifest.verify_manifest(path, manifest) == manifest["sha256"]
    assert manifest["opset"] == onnx_export.DEFAULT_OPSET and manifest["input"]["batch"] == 1
    assert manifest["classes"] == {"1": "box", "2": "disc"}
    assert manifest["config"]["name"] == "maskrcnn_tiny" and manifest["iterations"] == 30
    assert set(manifest["versions"]) == {"torch", "torchvision", "onnx", "onnxruntime"}
    tampered = tmp_path / "model.onnx"
    tampered.write_bytes(_perturbed(path, "mask_fcn_logits.weight", 1.001))
    with pytest.raises(onnx_manifest.ManifestError, match="does not match the manifest"):
        onnx_manifest.verify_manifest(tampered, manifest)


def test_onnx_dataset_round_trip_checks_the_digest(exported, tmp_path):
    path, manifest = exported
    dataset = OnnxModelDataset(filepath=str(tmp_path / "m" / "model.onnx"))
    dataset.save({"onnx": path.read_bytes(), "manifest": manifest})
    assert dataset.load()["onnx"] == path.read_bytes()
    assert (tmp_path / "m" / "model.manifest.json").exists()
    (tmp_path / "m" / "model.onnx").write_bytes(path.read_bytes()[:-1] + b"\0")
    with pytest.raises(DatasetError, match="does not match the manifest") as raised:
        dataset.load()
    assert isinstance(raised.value.__cause__, onnx_manifest.ManifestError)


def test_latency_report_has_both_backends(network, exported):
    images, _ = parity_images()
    report = onnx_latency.measure_latency(network, exported[0], images[:2],
                                          {"threads": 1, "warmup": 1, "repeats": 2})
    for backend in ("torch", "onnxruntime"):
        assert report[backend]["runs"] == 4
        assert 0 < report[backend]["median_ms"] <= report[backend]["p90_ms"]
    assert report["ratio"]["median"] == pytest.approx(
        report["onnxruntime"]["median_ms"] / report["torch"]["median_ms"])
    assert report["threads"] == 1 and len(report["per_image"]) == 2


def _val_images(root) -> pd.DataFrame:
    rng = np.random.default_rng(4)
    rows = []
    for image_id, (h, w) in enumerate(PARITY_SIZES, start=1):
        Image.fromarray(shapes_scene(rng, h, w)[0]).save(root / f"{image_id}.png")
        rows.append({"image_id": image_id, "file_name": f"{image_id}.png", "width": w,
                     "height": h, "split": "val", "source": "test"})
    return pd.DataFrame(rows)


def _run_export(trained, root, **parity) -> DataCatalog:
    params = {"opset": 17,
              "parity": {"num_images": 3, "box_atol": 1.0, "score_atol": 0.005,
                         "mask_iou_min": 0.9, "match_iou": 0.5, **parity},
              "latency": {"num_images": 2, "threads": 1, "warmup": 1, "repeats": 1},
              "session": {"graph_optimization_level": "all"}}
    catalog = DataCatalog({"model": MemoryDataset(trained),
                           "images": MemoryDataset(_val_images(root)),
                           "params:source": MemoryDataset({"root": str(root)}),
                           "params:export": MemoryDataset(params),
                           # file datasets: memory ones are released after their last use
                           "onnx_model": OnnxModelDataset(
                               filepath=str(root / "models" / "model.onnx")),
                           "parity_report": JSONDataset(filepath=str(root / "parity.json")),
                           "latency_report": JSONDataset(filepath=str(root / "latency.json"))})
    SequentialRunner().run(create_pipeline(), catalog)
    return catalog


def test_export_pipeline_slice_on_memory_catalog(trained, tmp_path):
    catalog = _run_export(trained, tmp_path)
    onnx_model = catalog.load("onnx_model")
    assert (tmp_path / "models" / "model.manifest.json").exists()
    assert onnx_model["manifest"]["sha256"] == hashlib.sha256(onnx_model["onnx"]).hexdigest()
    parity = catalog.load("parity_report")
    assert parity["passed"] and [r["image_id"] for r in parity["per_image"]] == [1, "blank", 2, 3]
    latency = catalog.load("latency_report")
    assert latency["parity_passed"] and {"torch", "onnxruntime"} <= set(latency)


def test_export_pipeline_fails_when_parity_breaks(trained, tmp_path):
    # an unreachable mask IoU bound stands in for a broken graph: the node must raise
    with pytest.raises(onnx_parity.ParityError, match=r"image 1 \(98x131\): mask IoU"):
        _run_export(trained, tmp_path, mask_iou_min=1.01)


def test_tracing_example_is_searched_beyond_the_parity_images(network, tmp_path):
    """Blank val images (no detections) come first; the search goes on to a scene, and
    fails with a clear message when no image within the limit has a detection."""
    from instseg_pipeline.pipelines.export.nodes import find_example

    scenes = _val_images(tmp_path)
    blanks = []
    for index, (h, w) in enumerate([(90, 120), (96, 96), (98, 131)], start=10):  # none found
        Image.fromarray(onnx_parity.blank_image(h, w)).save(tmp_path / f"{index}.png")
        blanks.append({"image_id": index - 10, "file_name": f"{index}.png", "width": w,
                       "height": h, "split": "val", "source": "test"})
    table = pd.concat([pd.DataFrame(blanks), scenes.assign(image_id=scenes["image_id"] + 10)])
    example = find_example(network, table, str(tmp_path), limit=6)
    assert example.std() > 0 and len(TorchBackend(network, "cpu")(to_chw(example))[
        "scores"])
    with pytest.raises(onnx_export.ExportError,
                       match=r"none of the 3 val images tried \(\[0, 1, 2"):
        find_example(network, table, str(tmp_path), limit=3)


def _conditioned_mobilenet():
    """Untrained MobileNetV3 Mask R-CNN made numerically tame for a parity check.

    From scratch its eval-mode features are ~1e-8 (batch-norm running stats of a fresh
    net), so outputs are noise. Running stats from a few random images and an FPN scaled to
    unit output give O(1) features; random class and mask logits then spread the scores.
    """
    net = build_model({"name": "maskrcnn_mobilenet_v3_large_fpn", "min_size": 160,
                       "max_size": 192, "box_detections_per_img": 10}, 3)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # a plain average over the calibration batch
            module.reset_running_stats()
    batch = torch.stack([net.transform.normalize(torch.rand(3, 160, 192)) for _ in range(4)])
    with torch.no_grad():
        net.backbone.train()(batch)
        features = net.eval().backbone(batch)
        std = float(torch.cat([v.flatten() for v in features.values()]).std())
        for conv in net.backbone.fpn.layer_blocks.modules():
            if isinstance(conv, torch.nn.Conv2d):
                conv.weight /= std
        torch.nn.init.normal_(net.roi_heads.box_predictor.cls_score.weight, std=0.3)
        torch.nn.init.normal_(net.roi_heads.mask_predictor.mask_fcn_logits.weight, std=1.0)
    return net


@pytest.mark.slow
def test_mobilenet_export_matches_eager_at_small_size(tmp_path):
    torch.manual_seed(0)
    network = _conditioned_mobilenet()
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in PARITY_SIZES]
    onnx_export.export_onnx(network, tmp_path / "m.onnx", example=images[1])
    images, ids = onnx_parity.insert_blank(images, PARITY_SIZES)
    report = onnx_parity.check_parity(network, tmp_path / "m.onnx", images, image_ids=ids)
    assert report["passed"], [r["failures"] for r in report["per_image"]]
    assert all(r["onnx_detections"] > 0 for r in report["per_image"])
