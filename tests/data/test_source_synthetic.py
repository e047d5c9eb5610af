"""The synthetic source: deterministic, idempotent, atomic, and a valid, demanding COCO set."""
from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from instseg_pipeline.data.masks import segmentation_problem
from instseg_pipeline.data.sources import synthetic

# Small images and raised shares keep the run short and every hard case present.
PARAMS = {"seed": 3, "num_images": 16, "min_size": 96, "max_size": 160,
          "empty_fraction": 0.1, "crowd_fraction": 0.2, "touching_fraction": 0.25}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _masks(coco: dict, image: dict) -> list[tuple[dict, np.ndarray]]:
    """(annotation, bool [H, W]) pairs of one image, decoded by pycocotools."""
    h, w = image["height"], image["width"]
    out = []
    for ann in coco["annotations"]:
        if ann["image_id"] != image["id"]:
            continue
        seg = ann["segmentation"]
        if isinstance(seg, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
        elif isinstance(seg["counts"], list):
            rle = mask_utils.frPyObjects(seg, h, w)
        else:
            rle = {"size": seg["size"], "counts": seg["counts"].encode()}
        out.append((ann, mask_utils.decode(rle).astype(bool)))
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict, dict]:
    root = tmp_path_factory.mktemp("synthetic") / "shapes"
    manifest = synthetic.generate(root, PARAMS)
    return root, json.loads((root / "annotations.json").read_text()), manifest


def test_same_params_give_byte_identical_files(dataset, tmp_path):
    root, _, manifest = dataset
    again = synthetic.generate(tmp_path / "again", PARAMS)
    assert again == manifest
    assert _files(tmp_path / "again") == _files(root)
    other = synthetic.generate(tmp_path / "other", {**PARAMS, "seed": 4})
    assert other["params_hash"] != manifest["params_hash"]
    assert (tmp_path / "other" / "annotations.json").read_bytes() != \
        (root / "annotations.json").read_bytes()


def test_second_call_reuses_the_dataset(tmp_path, monkeypatch, caplog):
    root = tmp_path / "shapes"
    params = {**PARAMS, "num_images": 3}
    manifest = synthetic.generate(root, params)
    stamp = (root / "annotations.json").stat().st_mtime_ns

    def must_not_write(*args):
        raise AssertionError("the fast path should not write anything")

    monkeypatch.setattr(synthetic, "_write_dataset", must_not_write)
    with caplog.at_level(logging.INFO, logger=synthetic.__name__):
        assert synthetic.generate(root, params) == manifest
    assert "up to date" in caplog.text
    assert (root / "annotations.json").stat().st_mtime_ns == stamp
    monkeypatch.undo()
    changed = synthetic.generate(root, {**params, "num_images": 2})
    assert changed["num_images"] == 2 and len(list((root / "images").iterdir())) == 2


def test_missing_image_triggers_regeneration(tmp_path):
    root = tmp_path / "shapes"
    params = {**PARAMS, "num_images": 2}
    synthetic.generate(root, params)
    (root / "images" / "000002.png").unlink()
    synthetic.generate(root, params)
    assert (root / "images" / "000002.png").is_file()


def _fail_after(count: int):
    calls = itertools.count()
    real = synthetic._write_png

    def write(path, image):
        if next(calls) == count:
            raise RuntimeError("simulated crash while writing images")
        real(path, image)
    return write


def test_interrupted_write_leaves_no_partial_dataset(tmp_path, monkeypatch):
    root = tmp_path / "shapes"
    monkeypatch.setattr(synthetic, "_write_png", _fail_after(3))
    with pytest.raises(RuntimeError, match="simulated crash"):
        synthetic.generate(root, {**PARAMS, "num_images": 5})
    assert not root.exists()
    assert list(tmp_path.iterdir()) == []


def test_interrupted_rewrite_keeps_the_previous_dataset(tmp_path, monkeypatch):
    root = tmp_path / "shapes"
    synthetic.generate(root, {**PARAMS, "num_images": 2})
    before = _files(root)
    monkeypatch.setattr(synthetic, "_write_png", _fail_after(1))
    with pytest.raises(RuntimeError, match="simulated crash"):
        synthetic.generate(root, {**PARAMS, "num_images": 4})
    assert _files(root) == before
    assert [p.name for p in tmp_path.iterdir()] == ["shapes"]


def test_refuses_to_replace_a_foreign_folder(tmp_path):
    root = tmp_path / "shapes"
    root.mkdir()
    (root / "notes.txt").write_text("not a synthetic dataset")
    with pytest.raises(FileExistsError, match="refusing"):
        synthetic.generate(root, {**PARAMS, "num_images": 1})
    assert (root / "notes.txt").is_file()


def test_rejects_bad_params():
    with pytest.raises(ValueError, match="unknown parameter"):
        synthetic.resolve_params({"num_image": 3})
    with pytest.raises(ValueError, match="min_size"):
        synthetic.resolve_params({"min_size": 300, "max_size": 200})
    with pytest.raises(ValueError, match="empty_fraction"):
        synthetic.resolve_params({"empty_fraction": 1.5})


def test_pycocotools_loads_it_with_contiguous_ids(dataset):
    root, coco, manifest = dataset
    api = COCO(str(root / "annotations.json"))
    assert sorted(api.getImgIds()) == list(range(1, PARAMS["num_images"] + 1))
    assert sorted(api.getAnnIds(iscrowd=None)) == list(range(1, len(coco["annotations"]) + 1))
    assert sorted(api.getCatIds()) == list(range(1, len(synthetic.CATEGORY_NAMES) + 1))
    assert manifest["num_annotations"] == len(coco["annotations"])
    assert coco["info"]["params_hash"] == manifest["params_hash"]
    for image in coco["images"]:
        h, w = cv2.imread(str(root / "images" / image["file_name"])).shape[:2]
        assert (h, w) == (image["height"], image["width"])


def test_segmentations_decode_and_barely_overlap(dataset):
    _, coco, _ = dataset
    for image in coco["images"]:
        pairs = _masks(coco, image)
        for ann, mask in pairs:
            assert segmentation_problem(ann["segmentation"], image["height"],
                                        image["width"]) is None, ann["id"]
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            assert ann["area"] == int(mask_utils.area(rle)) >= synthetic.MIN_VISIBLE_PIXELS
            assert ann["bbox"] == pytest.approx(mask_utils.toBbox(rle).tolist())
        for (a, ma), (b, mb) in itertools.combinations(pairs, 2):
            assert (ma & mb).sum() <= 12, (image["id"], a["id"], b["id"])


def test_image_pixels_follow_the_masks(dataset):
    """Each non-crowd instance is one solid-ish colour inside its annotated mask."""
    root, coco, _ = dataset
    for image in coco["images"]:
        pixels = cv2.imread(str(root / "images" / image["file_name"])).astype(np.float32)
        for ann, mask in _masks(coco, image):
            if ann["iscrowd"]:
                continue
            inside = pixels[mask]
            distance = np.abs(inside - np.median(inside, axis=0)).max(axis=1)
            assert (distance < 40).mean() > 0.95, (image["id"], ann["id"])


def test_it_holds_the_hard_cases(dataset):
    _, coco, manifest = dataset
    anns = coco["annotations"]
    crowds = [a for a in anns if a["iscrowd"]]
    assert crowds and all(isinstance(a["segmentation"]["counts"], list) for a in crowds)
    assert manifest["num_crowd"] == len(crowds)
    assert manifest["num_empty_images"] >= 1
    ratios = {round(im["width"] / im["height"], 2) for im in coco["images"]}
    assert len(ratios) >= 2
    assert _touching_same_class_pairs(coco) >= 1


def _touching_same_class_pairs(coco: dict) -> int:
    """Same-class, non-crowd annotations of one image whose masks share >= 5 px of border."""
    found = 0
    kernel = np.ones((3, 3), np.uint8)
    for image in coco["images"]:
        pairs = [(a, m) for a, m in _masks(coco, image) if not a["iscrowd"]]
        for (a, ma), (b, mb) in itertools.combinations(pairs, 2):
            grown = cv2.dilate(ma.astype(np.uint8), kernel).astype(bool)
            found += a["category_id"] == b["category_id"] and (grown & mb).sum() >= 5
    return found
