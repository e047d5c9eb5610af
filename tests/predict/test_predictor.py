"""Predictor: torch and ONNX Runtime (a file from `export.onnx.export_onnx`) agree, the
manifest guards the ONNX file, uploads decode with the image policy. The tiny model, its ONNX
export and the test images come from tests/model_fixtures.py."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from model_fixtures import (
    CLASSES,
    EXPORT_SIZE,
    export_tiny_onnx,
    png_bytes,
    png_header_only,
    scene,
    tiny_model_dict,
)
from PIL import Image
from pycocotools import mask as mask_utils

from instseg_pipeline.data.images import ImageProblem
from instseg_pipeline.data.masks import rle_bbox, string_to_rle
from instseg_pipeline.export.manifest import (
    ManifestError,
    file_sha256,
    manifest_path,
    read_manifest,
    write_manifest,
)
from instseg_pipeline.predict.predictor import (
    ModelNotFoundError,
    Predictor,
    decode_upload,
    find_latest_checkpoint,
)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("models")
    model_dict = tiny_model_dict()
    checkpoint = folder / "model.pt"
    torch.save(model_dict, checkpoint)
    return {"checkpoint": checkpoint, "onnx": export_tiny_onnx(model_dict, folder / "model.onnx")}


def _masks(instances: list[dict]) -> np.ndarray:
    rles = [{"size": i["rle"]["size"], "counts": i["rle"]["counts"].encode()} for i in instances]
    return np.transpose(mask_utils.decode(rles), (2, 0, 1))


@pytest.mark.parametrize("shape", [EXPORT_SIZE, (192, 256)])
def test_torch_and_onnx_agree(model_files, shape):
    image = scene(*shape)
    torch_out = Predictor.from_checkpoint(model_files["checkpoint"], device="cpu").predict(
        image, score_threshold=0.0)
    onnx_out = Predictor.from_onnx(model_files["onnx"]).predict(image, score_threshold=0.0)
    assert len(torch_out) == len(onnx_out) > 0
    assert [i["label"] for i in torch_out] == [i["label"] for i in onnx_out]
    np.testing.assert_allclose([i["score"] for i in torch_out], [i["score"] for i in onnx_out],
                               atol=1e-4)
    np.testing.assert_allclose([i["box"] for i in torch_out], [i["box"] for i in onnx_out],
                               atol=0.05)
    a, b = _masks(torch_out), _masks(onnx_out)
    assert a.shape == (len(torch_out), *shape)
    union = np.maximum((a | b).sum(axis=(1, 2)), 1)
    assert ((a & b).sum(axis=(1, 2)) / union).min() > 0.98


def test_instances_are_coco_shaped(model_files):
    predictor = Predictor.from_checkpoint(model_files["checkpoint"], device="cpu")
    image = scene()
    instances = predictor.predict(image, score_threshold=0.0, polygons=True)
    first = instances[0]
    x1, y1, x2, y2 = first["box"]  # the detector's box; bbox and area are the mask's
    assert x2 >= x1 and y2 >= y1
    assert first["bbox"] == rle_bbox(string_to_rle(first["rle"]["counts"], 192, 256))
    assert first["rle"]["size"] == [192, 256] and isinstance(first["rle"]["counts"], str)
    assert all(i["area"] > 0 for i in instances)  # empty masks are dropped
    assert first["category_name"] == CLASSES[first["label"]]
    assert [i["score"] for i in instances] == sorted((i["score"] for i in instances),
                                                     reverse=True)
    with_area = next(i for i in instances if i["area"] > 0)
    assert with_area["polygon"] and all(len(p) % 2 == 0 and len(p) >= 6
                                        for p in with_area["polygon"])
    high = predictor.predict(image, score_threshold=0.99)
    assert all(i["score"] >= 0.99 for i in high)


def test_info_names_backend_classes_and_version(model_files):
    torch_info = Predictor.from_checkpoint(model_files["checkpoint"], device="cpu").info()
    assert torch_info["backend"] == "torch" and torch_info["device"] == "cpu"
    assert torch_info["version"] == f"sha256:{file_sha256(model_files['checkpoint'])}"
    assert torch_info["classes"] == CLASSES and torch_info["iterations"] == 7
    onnx_info = Predictor.from_onnx(model_files["onnx"]).info()
    assert onnx_info["backend"] == "onnxruntime" and onnx_info["classes"] == CLASSES
    assert onnx_info["version"] == f"sha256:{file_sha256(model_files['onnx'])}"
    in_memory = Predictor.from_model(tiny_model_dict(), device="cpu").info()
    assert in_memory["version"] == "iterations:7"


def test_tampered_onnx_is_refused(model_files, tmp_path):
    tampered = tmp_path / "model.onnx"
    tampered.write_bytes(model_files["onnx"].read_bytes() + b"\0")
    manifest = manifest_path(model_files["onnx"])
    with pytest.raises(ManifestError, match="does not match the manifest"):
        Predictor.from_onnx(tampered, manifest)
    with pytest.raises(ManifestError, match="no manifest beside it"):
        Predictor.from_onnx(tampered)


def test_manifest_with_wrong_digest_is_refused(model_files, tmp_path):
    content = read_manifest(manifest_path(model_files["onnx"]))
    content["sha256"] = "0" * 64
    wrong = write_manifest(content, tmp_path / "wrong.json")
    with pytest.raises(ManifestError, match="SHA-256"):
        Predictor.from_onnx(model_files["onnx"], wrong)
    (tmp_path / "broken.json").write_text('{"classes": {}}')
    with pytest.raises(ManifestError, match="lacks the keys \\['sha256'\\]"):
        read_manifest(tmp_path / "broken.json")


def test_checkpoint_without_model_keys_is_named(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match=r"odd\.pt: missing keys \['config', 'classes'\]"):
        Predictor.from_checkpoint(path)


def test_latest_versioned_checkpoint_is_found(tmp_path):
    for source, version in [("synthetic", "2026-01-01T10.00.00.000Z"),
                            ("synthetic", "2026-03-01T10.00.00.000Z"),
                            ("coco", "2026-02-01T10.00.00.000Z")]:
        path = tmp_path / "data/06_models" / source / "model.pt" / version / "model.pt"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
    assert find_latest_checkpoint(tmp_path).parts[-2] == "2026-03-01T10.00.00.000Z"
    assert find_latest_checkpoint(tmp_path, "coco").parts[-4] == "coco"
    with pytest.raises(ModelNotFoundError, match="no trained model found"):
        find_latest_checkpoint(tmp_path / "empty")


def test_decode_upload_policy():
    image = scene(20, 30)
    assert np.array_equal(decode_upload(png_bytes(image)), image)
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(image).save(rotated, format="JPEG", exif=exif.tobytes(), quality=95)
    assert decode_upload(rotated.getvalue()).shape == (30, 20, 3)
    deep = Image.fromarray(np.full((4, 5), 65535, np.uint16))
    buffer = io.BytesIO()
    deep.save(buffer, format="PNG")
    assert decode_upload(buffer.getvalue()).max() == 255  # rescaled, not clipped at 255 of 65535


@pytest.mark.parametrize("data, max_pixels, reason", [
    (b"", 10_000, "empty_file"),
    (b"just some text, not an image", 10_000, "not_an_image"),
    (png_header_only(30_000, 30_000), 10_000, "too_many_pixels"),  # Pillow's own bomb check
    (png_header_only(3000, 3000), 1_000_000, "too_many_pixels"),  # our limit, header only
    (png_bytes(scene(20, 30))[:-30], 10_000, "corrupt"),
])
def test_decode_upload_rejects(data, max_pixels, reason):
    with pytest.raises(ImageProblem) as caught:
        decode_upload(data, max_pixels)
    assert caught.value.reason == reason
