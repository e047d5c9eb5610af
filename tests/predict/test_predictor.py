"""Predictor: torch and ONNX Runtime (a file from `export.export_onnx`) agree, the manifest
guards the ONNX file, uploads decode with the image policy. The helpers here (tiny model,
ONNX export, test images) are shared with test_api.py and test_predict_cli.py."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from instseg_pipeline.data.images import ImageProblem
from instseg_pipeline.models import build_model, model_config
from instseg_pipeline.predict.predictor import (
    ManifestError,
    ModelNotFoundError,
    Predictor,
    decode_upload,
    default_manifest_path,
    file_sha256,
    find_latest_checkpoint,
    read_manifest,
    write_manifest,
)

CLASSES = {1: "disk", 2: "square"}
TINY_PARAMS = {"name": "maskrcnn_tiny", "min_size": 224, "max_size": 256,
               "box_score_thresh": 0.0, "box_detections_per_img": 20}
EXPORT_SIZE = (200, 240)  # (H, W): the network resizes it by 256 / 240, away from rounding ties


def tiny_model_dict(seed: int = 0) -> dict:
    """An untrained maskrcnn_tiny as the training pipeline saves it (it still detects)."""
    torch.manual_seed(seed)
    num_classes = len(CLASSES) + 1
    network = build_model(TINY_PARAMS, num_classes)
    return {"config": model_config(TINY_PARAMS, num_classes), "state_dict": network.state_dict(),
            "classes": dict(CLASSES), "iterations": 7}


def save_checkpoint(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tiny_model_dict(seed), path)
    return path


def export_tiny_onnx(model_dict: dict, path: Path) -> Path:
    """``<path>`` ONNX + manifest through the project's exporter (`export.export_onnx`)."""
    from instseg_pipeline.export import export_onnx
    from instseg_pipeline.models import load_model

    network = load_model(model_dict["config"], model_dict["state_dict"]).eval()
    export_onnx(network, path, opset=17, example_size=EXPORT_SIZE,
                classes=model_dict["classes"], config=model_dict["config"],
                iterations=model_dict["iterations"])
    return path


def scene(height: int = 192, width: int = 256, seed: int = 0) -> np.ndarray:
    """uint8 [H, W, 3]: a noisy background with a bright disk and a dark square."""
    rng = np.random.default_rng(seed)
    image = rng.integers(60, 120, size=(height, width, 3), dtype=np.uint8)
    ys, xs = np.mgrid[:height, :width]
    image[(ys - height // 2) ** 2 + (xs - width // 3) ** 2 < (height // 5) ** 2] = (240, 200, 40)
    image[height // 6: height // 6 + height // 4, width - width // 3: width - width // 8] = (
        20, 40, 160)
    return image


def png_bytes(image: np.ndarray, **save_args) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", **save_args)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A 60-byte PNG whose IHDR claims ``width`` x ``height`` RGB pixels (a pixel bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
            + chunk(b"IEND", b""))


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
    x1, y1, x2, y2 = first["box"]
    assert first["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1])
    assert first["rle"]["size"] == [192, 256] and isinstance(first["rle"]["counts"], str)
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
    manifest = default_manifest_path(model_files["onnx"])
    with pytest.raises(ManifestError, match="does not match the manifest"):
        Predictor.from_onnx(tampered, manifest)
    with pytest.raises(ManifestError, match="no manifest beside it"):
        Predictor.from_onnx(tampered)


def test_manifest_with_wrong_digest_is_refused(model_files, tmp_path):
    content = read_manifest(default_manifest_path(model_files["onnx"]))
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
