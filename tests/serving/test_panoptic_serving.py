"""Serving a semantic (panoptic) model: /segment through a real uvicorn process returns the
stuff segments with their category names, cut as the evaluation's panoptic merge cuts them;
the predictor's options, the demo's drawing and instseg-predict's stuff.json in-process.

The model is the test family of `semantic_family` (maskrcnn_tiny + a semantic map with
stuff label 1 on the top half of the image and label 2 on the bottom half), so where stuff
must be is known exactly.
"""
from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import httpx
import numpy as np
import pytest
from model_fixtures import one_thread, png_bytes, save_checkpoint, scene  # noqa: F401
from PIL import Image
from process_fixtures import running
from pycocotools import mask as mask_utils
from semantic_family import (
    STUFF_CATEGORY_IDS,
    STUFF_CLASSES,
    THING_CLASSES,
    save_semantic_checkpoint,
    semantic_family,  # noqa: F401
    semantic_model_dict,
)

from instseg_pipeline.evaluation.config import PanopticConfig
from instseg_pipeline.evaluation.panoptic import instances_to_panoptic
from instseg_pipeline.predict.panoptic import combine_panoptic
from instseg_pipeline.predict.postprocess import PanopticOptions, no_stuff
from instseg_pipeline.predict.predictor import Predictor
from instseg_pipeline.predict.preprocess import to_chw
from instseg_pipeline.serving.api import ServiceSettings

HEIGHT, WIDTH = 192, 256
NAMES = {STUFF_CATEGORY_IDS[k]: name for k, name in STUFF_CLASSES.items()}  # id -> name
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def checkpoint(semantic_family, tmp_path_factory) -> Path:  # noqa: F811
    return save_semantic_checkpoint(tmp_path_factory.mktemp("semantic") / "model.pt")


@pytest.fixture(scope="module")
def predictor(checkpoint) -> Predictor:
    return Predictor.from_checkpoint(checkpoint, device="cpu")


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return scene(HEIGHT, WIDTH)


@pytest.fixture(scope="module")
def url(checkpoint, tmp_path_factory):
    """A real uvicorn server (instseg-serve) with the test family registered."""
    folder = tmp_path_factory.mktemp("serve")
    env = {k: v for k, v in os.environ.items() if not k.startswith("INSTSEG_")}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    args = ["semantic_family", "serve", "--host", "127.0.0.1", "--checkpoint", str(checkpoint),
            "--device", "cpu", "--threads", "1", "--log-level", "warning"]
    with running(args, folder / "server.log", folder, env, "/health", "server") as base:
        yield base


def _segment(url: str, image: np.ndarray, **fields) -> dict:
    response = httpx.post(f"{url}/segment", files={"file": ("scene.png", png_bytes(image),
                                                            "image/png")},
                          data={k: str(v) for k, v in fields.items()}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def _decode(rle: dict) -> np.ndarray:
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})


def _halves() -> dict[int, np.ndarray]:
    """Stuff category id -> where the test family's semantic map puts it."""
    top = np.zeros((HEIGHT, WIDTH), bool)
    top[: HEIGHT // 2] = True
    return {STUFF_CATEGORY_IDS[1]: top, STUFF_CATEGORY_IDS[2]: ~top}


def _expected_stuff(instances: list[dict], options: PanopticOptions) -> dict[int, np.ndarray]:
    """Stuff category id -> mask, recomputed from the returned instances with the
    evaluation's thing merge (`instances_to_panoptic`) and the halves."""
    masks = np.stack([_decode(i["rle"]) for i in instances]) if instances else np.zeros(
        (0, HEIGHT, WIDTH), np.uint8)
    id_map, _ = instances_to_panoptic(masks, [i["score"] for i in instances],
                                      [i["label"] for i in instances],
                                      overlap_threshold=options.overlap_threshold,
                                      min_area=options.min_area, score_threshold=0.0)
    free = {cat: half & (id_map == 0) for cat, half in _halves().items()}
    return {cat: mask for cat, mask in free.items() if mask.sum() >= options.stuff_min_area}


# --- through the HTTP service -------------------------------------------------------------------

def test_model_says_it_is_semantic(url):
    model = httpx.get(f"{url}/model").json()
    assert model["semantic"] is True and model["model_name"] == "semantictest_tiny"
    assert model["stuff_categories"] == {str(k): v for k, v in NAMES.items()}
    assert model["classes"] == {str(k): v for k, v in THING_CLASSES.items()}


def test_segment_returns_stuff_with_names(url, image, predictor):
    body = _segment(url, image, score_threshold=0.0, include_polygons="true")
    instances, stuff = body["instances"], body["stuff"]
    # the instance list is the predictor's, untouched by the panoptic merge
    assert len(instances) == len(predictor.predict(image, 0.0)) > 0
    expected = _expected_stuff(instances, PanopticOptions())
    assert [s["category_id"] for s in stuff] == sorted(expected)
    assert {s["category_name"] for s in stuff} == {NAMES[c] for c in expected} == {"sky",
                                                                                   "grass"}
    for segment in stuff:
        mask = _decode(segment["rle"]).astype(bool)
        assert np.array_equal(mask, expected[segment["category_id"]]), segment["category_name"]
        assert segment["area"] == mask.sum()
        ys, xs = np.nonzero(mask)
        assert segment["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1,
                                   ys.max() - ys.min() + 1]
        assert segment["polygon"] and all(len(part) % 2 == 0 for part in segment["polygon"])
    sky, grass = (_decode(s["rle"]).astype(bool) for s in stuff)
    assert not (sky & grass).any()
    # some instance claimed pixels of the top half: sky is cut around them
    assert sky.sum() < _halves()[STUFF_CATEGORY_IDS[1]].sum()


def test_stuff_is_the_evaluation_merge_at_the_default_threshold(url, image, predictor):
    """At score_threshold 0.5 (the evaluation's panoptic score_threshold), the served stuff
    is `combine_panoptic` on the raw detections, as the evaluation runs it."""
    body = _segment(url, image)
    found = predictor.detect(image, 0.0)  # everything: combine_panoptic applies the 0.5
    config = PanopticConfig()
    id_map, segments = combine_panoptic(
        found.masks, found.scores, found.labels, found.semantic, STUFF_CATEGORY_IDS,
        score_threshold=config.score_threshold, overlap_threshold=config.overlap_threshold,
        min_area=config.min_area, stuff_min_area=config.stuff_min_area)
    stuff = [s for s in segments if "score" not in s]
    assert [s["category_id"] for s in body["stuff"]] == [s["category_id"] for s in stuff]
    for served, segment in zip(body["stuff"], stuff):
        assert np.array_equal(_decode(served["rle"]).astype(bool), id_map == segment["id"])


def test_openapi_documents_stuff_and_every_field(url):
    schema = httpx.get(f"{url}/openapi.json").json()
    models = schema["components"]["schemas"]
    response = models["SegmentResponse"]["properties"]
    assert response["stuff"]["items"]["$ref"].endswith("/StuffSegment")
    assert "empty list for an instance model" in response["stuff"]["description"]
    assert {"category_id", "category_name", "area", "bbox", "rle", "polygon"} == set(
        models["StuffSegment"]["properties"])
    assert {"semantic", "stuff_categories"} <= set(models["ModelInfo"]["properties"])
    response_models = ("SegmentResponse", "Instance", "StuffSegment", "RLE", "ImageSize",
                       "ModelInfo", "Timing", "InteractiveResponse", "PromptMask", "Health",
                       "ErrorResponse")
    undocumented = [f"{name}.{field}" for name in response_models
                    for field, spec in models[name]["properties"].items()
                    if not spec.get("description")]
    assert undocumented == []
    assert "stuff segments" in schema["paths"]["/segment"]["post"]["description"]


# --- the predictor in-process -------------------------------------------------------------------

def test_stuff_min_area_drops_small_stuff(checkpoint, image):
    half = HEIGHT // 2 * WIDTH  # no instance at threshold 1.0: each half is all stuff
    for minimum, kept in ((half, 2), (half + 1, 0)):
        predictor = Predictor.from_checkpoint(
            checkpoint, device="cpu", panoptic=PanopticOptions(stuff_min_area=minimum))
        answer = predictor.segment(image, 1.0)
        assert answer["instances"] == [] and len(answer["stuff"]) == kept
        assert all(s["area"] == half for s in answer["stuff"])


def test_panoptic_defaults_are_the_evaluations():
    options, evaluation = PanopticOptions(), PanopticConfig()
    assert (options.overlap_threshold, options.min_area, options.stuff_min_area) == (
        evaluation.overlap_threshold, evaluation.min_area, evaluation.stuff_min_area)
    names = inspect.signature(combine_panoptic).parameters
    assert {"overlap_threshold", "min_area", "stuff_min_area"} <= set(names)
    with pytest.raises(ValueError, match="stuff_min_area must be >= 1"):
        PanopticOptions(stuff_min_area=0)
    with pytest.raises(ValueError, match="INSTSEG_STUFF_MIN_AREA"):
        ServiceSettings.from_env({"INSTSEG_STUFF_MIN_AREA": "0"})
    with pytest.raises(ValueError, match=r"\$INSTSEG_OVERLAP_THRESHOLD must be a number"):
        ServiceSettings.from_env({"INSTSEG_OVERLAP_THRESHOLD": "half"})
    settings = ServiceSettings.from_env({"INSTSEG_STUFF_MIN_AREA": "4096"})
    assert settings.panoptic_options().stuff_min_area == 4096


def test_semantic_model_without_stuff_categories_is_refused(semantic_family):  # noqa: F811
    model_dict = semantic_model_dict()
    del model_dict["stuff_category_ids"]
    with pytest.raises(ValueError, match="model.pt: a semantictest_tiny model .* needs "
                                         "'stuff_category_ids'"):
        Predictor.from_model(model_dict, device="cpu", source="model.pt")


def test_semantic_model_without_a_semantic_output_is_an_error(predictor, image):
    raw = predictor.backend(to_chw(image))
    lacking = Predictor(lambda tensor: {k: v for k, v in raw.items() if k != "semantic"},
                        predictor.classes, predictor.version, None, STUFF_CATEGORY_IDS,
                        STUFF_CLASSES)
    with pytest.raises(ValueError, match="semantic model .* carry no 'semantic' map"):
        lacking.segment(image, 0.5)


# --- the demo and instseg-predict ---------------------------------------------------------------

def test_demo_draws_stuff_under_the_instances(predictor, image):
    from instseg_pipeline.serving.demo import (
        STUFF_ALPHA,
        STUFF_HEADERS,
        draw_instances,
        enlarge,
        segment_panoptic,
        stuff_colour,
        stuff_hex_colour,
        zoom_factor,
    )

    factor = zoom_factor(image.shape)
    found = predictor.detect(image, 1.0)  # no instance: the stuff alone
    stuff = predictor.stuff(found)
    assert len(found) == 0 and len(stuff) == 2
    plain = draw_instances(image, found, predictor.classes)
    assert np.array_equal(plain, enlarge(image, factor))
    drawn = draw_instances(image, found, predictor.classes, stuff, predictor.stuff_categories)
    big = enlarge(image, factor).astype(np.float32)
    for category_id, half in _halves().items():
        where = enlarge(half, factor)
        tinted = np.round((1 - STUFF_ALPHA) * big + STUFF_ALPHA * np.array(
            stuff_colour(category_id), np.float32))
        # most of the half is the muted tint (outlines and the name tag aside) ...
        assert (np.abs(drawn[where] - tinted[where]).max(axis=1) <= 1).mean() > 0.9
        # ... and the name sits on a tag filled with the category's colour
        assert np.all(drawn[where] == stuff_colour(category_id), axis=1).sum() > 50
    assert stuff_colour(101) != stuff_colour(102)
    # with instances: the instances are drawn as without stuff, the stuff fills the rest
    overlay, _, instances, stuff_rows, stuff_dicts = segment_panoptic(predictor, image, 0.0)
    assert instances and overlay.shape == (HEIGHT * factor, WIDTH * factor, 3)
    assert [row[0] for row in stuff_rows] == [s["category_name"] for s in stuff_dicts] == [
        "sky", "grass"]
    assert len(STUFF_HEADERS) == len(stuff_rows[0]) and stuff_rows[0][-1] == stuff_hex_colour(101)
    without = draw_instances(image, predictor.detect(image, 0.0), predictor.classes)
    stuff_pixels = np.any([_decode(s["rle"]) for s in stuff_dicts], axis=0)
    things = enlarge(~stuff_pixels, factor)  # pixels the instances claimed
    any_instance = np.any([_decode(i["rle"]) for i in instances], axis=0)
    only_stuff = enlarge(stuff_pixels & ~any_instance, factor)
    assert things.sum() > 100 and only_stuff.sum() > 100
    assert np.all(overlay[things] == without[things], axis=1).mean() > 0.95
    assert np.all(overlay[only_stuff] != without[only_stuff], axis=1).mean() > 0.8


def test_demo_of_a_semantic_model_has_the_stuff_table(predictor):
    from instseg_pipeline.serving.demo import build_demo, model_summary
    from instseg_pipeline.serving.interactive import InteractiveSegmenter

    segmenter = InteractiveSegmenter(predictor)
    assert "**stuff categories** 101: sky, 102: grass" in model_summary(predictor, segmenter)
    demo = build_demo(predictor, segmenter)
    config = json.dumps(demo.config, default=str)
    assert "segment-stuff-table" in config and "Panoptic segmentation" in config


def test_predict_command_writes_stuff(predictor, image, tmp_path):
    from instseg_pipeline.commands.predict import predict_files

    path = tmp_path / "7.png"
    path.write_bytes(png_bytes(image))
    summary = predict_files(predictor, [path], tmp_path / "out", 1.0, 0.5,
                            predictor.category_ids)
    assert summary["stuff_segments"] == 2 and summary["instances"] == 0
    written = json.loads(Path(summary["stuff"]).read_text())
    assert [(s["image_id"], s["category_name"], s["area"]) for s in written] == [
        (7, "sky", HEIGHT // 2 * WIDTH), (7, "grass", HEIGHT // 2 * WIDTH)]
    assert np.array_equal(_decode(written[0]["segmentation"]).astype(bool),
                          _halves()[101])
    overlay = np.asarray(Image.open(tmp_path / "out/overlays/7.png").convert("RGB"))
    assert np.abs(overlay.astype(int) - image).mean() > 10  # the stuff is tinted


def test_instance_model_has_no_stuff(tmp_path, image):
    predictor = Predictor.from_checkpoint(save_checkpoint(tmp_path / "model.pt"), device="cpu")
    answer = predictor.segment(image, 0.0)
    assert predictor.semantic is False and predictor.info()["stuff_categories"] == {}
    assert answer["stuff"] == [] and answer["instances"] == predictor.predict(image, 0.0)
    assert len(predictor.stuff(predictor.detect(image, 0.0))) == 0
    assert len(no_stuff(HEIGHT, WIDTH)) == 0


# --- the ONNX path: panoptic_fpn_tiny exported with its manifest --------------------------------

def test_exported_panoptic_fpn_serves_stuff_through_onnx(tmp_path, image):
    """load_predictor on model.onnx + manifest: the manifest makes it semantic and names the
    stuff, the graph's fifth output is its map. The semantic branch is set to answer stuff
    label 1 everywhere (a zero 1x1 predictor with bias on label 1), so the stuff must be
    exactly the pixels the returned instances leave free."""
    import torch

    from instseg_pipeline.export.onnx import export_onnx
    from instseg_pipeline.models import build_model, model_config
    from instseg_pipeline.predict.predictor import load_predictor

    params = {"name": "panoptic_fpn_tiny", "min_size": 160, "max_size": 256,
              "box_score_thresh": 0.0, "box_detections_per_img": 10, "stuff_classes": 2}
    torch.manual_seed(0)
    network = build_model(params, len(THING_CLASSES) + 1).eval()
    with torch.no_grad():
        network.semantic_head.predictor.weight.zero_()
        network.semantic_head.predictor.bias.copy_(torch.tensor([0.0, 5.0, 0.0]))
    path = tmp_path / "model.onnx"
    export_onnx(network, path, example_size=(HEIGHT, WIDTH), classes=THING_CLASSES,
                config=model_config(params, len(THING_CLASSES) + 1),
                stuff_classes=STUFF_CLASSES, stuff_category_ids=STUFF_CATEGORY_IDS,
                iterations=0)
    predictor = load_predictor(onnx=path, threads=1)
    assert predictor.backend_name == "onnxruntime" and predictor.semantic
    assert predictor.info()["stuff_categories"] == NAMES
    answer = predictor.segment(image, 0.0)
    assert answer["instances"]
    masks = np.stack([_decode(i["rle"]) for i in answer["instances"]])
    id_map, _ = instances_to_panoptic(masks, [i["score"] for i in answer["instances"]],
                                      [i["label"] for i in answer["instances"]],
                                      score_threshold=0.0)
    assert [(s["category_id"], s["category_name"]) for s in answer["stuff"]] == [(101, "sky")]
    assert np.array_equal(_decode(answer["stuff"][0]["rle"]).astype(bool), id_map == 0)
