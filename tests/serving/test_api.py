"""The HTTP service through real uvicorn processes on 127.0.0.1 (free ports)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from model_fixtures import (
    CLASSES,
    png_bytes,
    png_header_only,
    save_checkpoint,
    scene,
)
from process_fixtures import free_port, running
from pycocotools import mask as mask_utils

from instseg_pipeline.predict.predictor import Predictor, file_sha256
from instseg_pipeline.serving.api import ServiceSettings, load_service
from instseg_pipeline.serving.interactive import build_sam, parse_prompts, sam_config

MAX_UPLOAD = 300_000
MAX_PIXELS = 1_000_000
TINY_SAM = {"image_size": 128, "patch_size": 16, "encoder_embed_dim": 32, "encoder_depth": 2,
            "encoder_num_heads": 2, "encoder_global_attn_indexes": [1], "window_size": 4,
            "prompt_embed_dim": 32, "mask_in_chans": 4, "decoder_mlp_dim": 64,
            "decoder_num_heads": 2, "iou_head_hidden_dim": 32}


def _clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INSTSEG_")}
    return {**env, **extra}


def server(args: list[str], log: Path, cwd: Path, env: dict | None = None):
    """A server process started with ``args`` (port appended); yields its base URL."""
    return running(args, log, cwd, env or _clean_env(), "/health", "server")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("model") / "model.pt")


@pytest.fixture(scope="module")
def url(checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    args = ["instseg_pipeline.commands.serve", "--host", "127.0.0.1", "--checkpoint",
            str(checkpoint), "--device", "cpu", "--max-upload-bytes", str(MAX_UPLOAD),
            "--max-pixels", str(MAX_PIXELS), "--threads", "1", "--log-level", "warning"]
    with server(args, folder / "server.log", folder) as base:
        yield base


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return scene(192, 256)


def _post(url: str, path: str, content: bytes, name: str = "image.png",
          params: dict | None = None, data: dict | None = None) -> httpx.Response:
    return httpx.post(f"{url}{path}", files={"file": (name, content, "application/octet-stream")},
                      data=data or {}, params=params or {}, timeout=60)


def _decode(rle: dict) -> np.ndarray:
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})


# --- discovery endpoints ------------------------------------------------------------------------

def test_health_and_model(url, checkpoint):
    health = httpx.get(f"{url}/health").json()
    assert health == {"status": "ok", "backend": "torch",
                      "model_version": f"sha256:{file_sha256(checkpoint)}"}
    model = httpx.get(f"{url}/model").json()
    assert model["classes"] == {str(k): v for k, v in CLASSES.items()}
    assert model["backend"] == "torch" and model["device"] == "cpu"
    assert model["iterations"] == 7 and model["interactive_methods"] == ["model", "grabcut"]
    assert model["semantic"] is False and model["stuff_categories"] == {}


def test_openapi_describes_every_endpoint(url):
    schema = httpx.get(f"{url}/openapi.json").json()
    expected = {"/segment": "post", "/segment_interactive": "post", "/health": "get",
                "/model": "get"}
    assert set(expected) <= set(schema["paths"])
    for path, method in expected.items():
        operation = schema["paths"][path][method]
        assert operation["summary"] and operation["description"], path
        ok = operation["responses"]["200"]["content"]["application/json"]["schema"]
        assert ok["$ref"].split("/")[-1] in schema["components"]["schemas"], path
    for path in ("/segment", "/segment_interactive"):
        assert {"413", "415", "422"} <= set(schema["paths"][path]["post"]["responses"])
    instance = schema["components"]["schemas"]["Instance"]["properties"]
    assert {"label", "category_name", "score", "box", "bbox", "rle"} <= set(instance)


# --- /segment -----------------------------------------------------------------------------------

def test_segment_matches_the_predictor(url, checkpoint, image):
    response = _post(url, "/segment", png_bytes(image), data={"score_threshold": "0"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["image"] == {"width": 256, "height": 192}
    assert body["model"]["backend"] == "torch" and body["timing_ms"]["total"] > 0
    expected = Predictor.from_checkpoint(checkpoint, device="cpu").predict(image, 0.0)
    assert len(body["instances"]) == len(expected) > 0
    np.testing.assert_allclose([i["score"] for i in body["instances"]],
                               [i["score"] for i in expected], atol=1e-4)
    assert [i["label"] for i in body["instances"]] == [i["label"] for i in expected]
    assert _decode(body["instances"][0]["rle"]).shape == (192, 256)
    assert body["instances"][0]["polygon"] is None
    assert body["stuff"] == []  # an instance model: always an empty list


def test_segment_query_threshold_and_polygons(url, image):
    body = _post(url, "/segment", png_bytes(image),
                 params={"score_threshold": 0.3, "include_polygons": "true"}).json()
    assert all(i["score"] >= 0.3 for i in body["instances"])
    low = _post(url, "/segment", png_bytes(image), data={"score_threshold": "0"}).json()
    assert len(low["instances"]) >= len(body["instances"])
    assert all(isinstance(i["polygon"], list) for i in body["instances"])


def test_concurrent_requests_all_answer(url, image):
    payload = png_bytes(image)
    with ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(lambda _: _post(url, "/segment", payload).status_code, range(6)))
    assert codes == [200] * 6


# --- limits and bad uploads ---------------------------------------------------------------------

def test_upload_over_byte_limit_is_413(url):
    noisy = np.random.default_rng(1).integers(0, 255, (400, 500, 3), dtype=np.uint8)
    payload = png_bytes(noisy)
    assert len(payload) > MAX_UPLOAD + 64 * 1024  # past the Content-Length check
    response = _post(url, "/segment", payload)
    assert response.status_code == 413 and "exceeds the upload limit" in response.json()["detail"]


def test_chunked_upload_over_byte_limit_is_413(url):
    """No Content-Length to check up front: the server stops reading at the limit."""
    boundary = "instsegboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"big.png\"\r\nContent-Type: image/png\r\n\r\n").encode() + \
        b"\0" * (MAX_UPLOAD + 10) + f"\r\n--{boundary}--\r\n".encode()
    response = httpx.post(f"{url}/segment", content=iter([body[:1000], body[1000:]]),
                          headers={"content-type": f"multipart/form-data; boundary={boundary}"},
                          timeout=60)
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert response.status_code == 413 and "big.png" in response.json()["detail"]


@pytest.mark.parametrize("width, height", [(30_000, 30_000), (1200, 1000)])
def test_pixel_bomb_header_is_413(url, width, height):
    payload = png_header_only(width, height)
    assert len(payload) < 100
    for path in ("/segment", "/segment_interactive"):
        response = _post(url, path, payload, data={"points": "[[1, 1]]", "labels": "[1]"})
        assert response.status_code == 413, response.text
        assert "pixels" in response.json()["detail"]


def test_empty_and_non_image_uploads_are_415(url):
    empty = _post(url, "/segment", b"", name="empty.png")
    assert empty.status_code == 415 and "empty (0 bytes)" in empty.json()["detail"]
    text = _post(url, "/segment", b"hello, I am text\n" * 10, name="photo.jpg")
    assert text.status_code == 415
    assert "photo.jpg" in text.json()["detail"] and "not a readable image" in text.json()["detail"]


def test_truncated_image_is_422(url, image):
    response = _post(url, "/segment", png_bytes(image)[:-200], name="cut.png")
    assert response.status_code == 422
    detail = response.json()["detail"][0]
    assert detail["loc"] == ["body", "file"] and "truncated or corrupt" in detail["msg"]


def test_threshold_out_of_range_is_422(url, image):
    response = _post(url, "/segment", png_bytes(image), data={"score_threshold": "1.5"})
    assert response.status_code == 422


# --- /segment_interactive -----------------------------------------------------------------------

@pytest.mark.parametrize("fields, field, message", [
    ({"points": "[[10, 10]", "labels": "[1]"}, "points", "not valid JSON"),
    ({"points": "[[10, 10, 3]]", "labels": "[1]"}, "points", "list of [x, y] pairs"),
    ({"points": "[[10, 10], [20, 20]]", "labels": "[1]"}, "labels", "1 entries but points has 2"),
    ({"points": "[[10, 10]]", "labels": "[2]"}, "labels", "0 (exclude) or 1 (include)"),
    ({"points": "[[300, 10]]", "labels": "[1]"}, "points", "outside the 256x192 image"),
    ({"points": "[[10, 10]]", "labels": "[0]"}, "points", "at least one positive point"),
    ({"points": "[]", "labels": "[]", "box": "[10, 10, 5, 20]"}, "box", "x1 < x2"),
    ({"points": "[]", "labels": "[]", "box": "[0, 0, 100, 400]"}, "box", "outside"),
])
def test_bad_prompts_are_422(url, image, fields, field, message):
    response = _post(url, "/segment_interactive", png_bytes(image), data=fields)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"][0]
    assert detail["loc"] == ["body", field] and message in detail["msg"]


def test_interactive_uses_the_instance_under_the_point(url, image):
    instances = _post(url, "/segment", png_bytes(image), data={"score_threshold": "0"}).json()[
        "instances"]
    target = next(i for i in instances if i["area"] > 0)
    ys, xs = np.nonzero(_decode(target["rle"]))
    x, y = int(xs[len(xs) // 2]), int(ys[len(ys) // 2])
    response = _post(url, "/segment_interactive", png_bytes(image), data={
        "points": json.dumps([[x + 0.5, y + 0.5]]), "labels": "[1]", "score_threshold": "0"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["method"] == "model" and body["masks"]
    assert any(m["rle"]["counts"] == target["rle"]["counts"] for m in body["masks"])
    for mask in body["masks"]:
        assert _decode(mask["rle"])[y, x] == 1 and mask["category_name"] in CLASSES.values()


def test_interactive_falls_back_to_grabcut(url, image):
    # no instance of the untrained model reaches 0.99, so nothing covers the point
    x, y = 256 // 3, 192 // 2  # the disk's centre
    response = _post(url, "/segment_interactive", png_bytes(image), data={
        "points": json.dumps([[x, y], [5, 5]]), "labels": "[1, 0]", "score_threshold": "0.99"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["method"] == "grabcut" and len(body["masks"]) == 1
    mask = _decode(body["masks"][0]["rle"])
    assert mask.shape == (192, 256) and mask[y, x] == 1 and mask[5, 5] == 0
    disk = np.all(image == (240, 200, 40), axis=2)
    iou = (mask.astype(bool) & disk).sum() / (mask.astype(bool) | disk).sum()
    assert iou > 0.8, iou  # GrabCut finds the colour-uniform disk


def test_interactive_grabcut_with_box(url, image):
    box = [256 - 256 // 3 - 6, 192 // 6 - 6, 256 - 256 // 8 + 6, 192 // 6 + 192 // 4 + 6]
    response = _post(url, "/segment_interactive", png_bytes(image), data={
        "box": json.dumps(box), "score_threshold": "0.99"})
    body = response.json()
    assert body["method"] == "grabcut"
    mask = _decode(body["masks"][0]["rle"]).astype(bool)
    square = np.all(image == (20, 40, 160), axis=2)
    assert (mask & square).sum() / (mask | square).sum() > 0.8
    assert not mask[:, : box[0]].any()  # nothing outside the box


# --- SAM and startup failure --------------------------------------------------------------------

@pytest.fixture(scope="module")
def sam_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    sam = build_sam(sam_config("vit_b", TINY_SAM))
    path = tmp_path_factory.mktemp("sam") / "tiny_sam.pt"
    torch.save({"config": TINY_SAM, "state_dict": sam.state_dict()}, path)
    return path


def test_sam_answers_prompts_when_configured(checkpoint, sam_checkpoint, image):
    """In-process (a third server would cost seconds): the same settings and service code."""
    settings = ServiceSettings.from_env({
        "INSTSEG_CHECKPOINT": str(checkpoint), "INSTSEG_DEVICE": "cpu",
        "INSTSEG_SAM_CHECKPOINT": str(sam_checkpoint), "INSTSEG_SAM_MODEL_TYPE": "custom"})
    service = load_service(settings)
    assert service.model_info()["interactive_methods"] == ["sam"]
    one = service.interactive.segment(image, parse_prompts("[[80, 90]]", "[1]"))
    boxed = service.interactive.segment(image, parse_prompts(
        "[[80, 90], [5, 5]]", "[1, 0]", "[40, 50, 130, 140]"))
    assert one.method == boxed.method == "sam"
    assert one.masks.shape == (3, 192, 256) and boxed.masks.shape == (1, 192, 256)
    assert one.masks.dtype == np.uint8 and list(one.scores) == sorted(one.scores, reverse=True)


def test_startup_without_a_model_fails_clearly(tmp_path):
    log = tmp_path / "fail.log"
    with open(log, "wb") as output:
        result = subprocess.run(
            [sys.executable, "-m", "uvicorn", "instseg_pipeline.serving.api:app",
             "--host", "127.0.0.1", "--port", str(free_port())],
            cwd=tmp_path, env=_clean_env(), stdout=output, stderr=subprocess.STDOUT,
            timeout=120, check=False)
    text = log.read_text()
    assert result.returncode != 0
    assert "no trained model found" in text and "data/06_models/*/model.pt" in text


def test_serve_help_documents_every_option():
    out = subprocess.run([sys.executable, "-m", "instseg_pipeline.commands.serve", "--help"],
                         check=False, capture_output=True, text=True, timeout=60).stdout
    for option in ("--host", "--port", "--checkpoint", "--onnx", "--manifest", "--device",
                   "--sam-checkpoint", "--max-upload-bytes", "--max-pixels"):
        assert option in out
    assert out.count("default") >= 5
