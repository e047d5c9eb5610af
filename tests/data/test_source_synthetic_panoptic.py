"""The synthetic source's stuff and panoptic export: the things are the same with and
without stuff, the export is a valid COCO panoptic set (round trip, PQ 1 against itself),
and ingestion reads instances as COCO and stuff from the export."""
from __future__ import annotations

import hashlib
import json
from operator import itemgetter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from instseg_pipeline.data.config import SourceConfig
from instseg_pipeline.data.masks import decode_strings, rgb_to_id
from instseg_pipeline.data.panoptic import write_panoptic
from instseg_pipeline.data.quality import QualityReport
from instseg_pipeline.data.sources import coco_panoptic, synthetic
from instseg_pipeline.data.sources.registry import read_source
from instseg_pipeline.data.tables import check_tables, label_mapping, stuff_mapping
from instseg_pipeline.evaluation.panoptic import pq_from_files

PARAMS = {"seed": 3, "num_images": 16, "min_size": 96, "max_size": 160,
          "empty_fraction": 0.1, "crowd_fraction": 0.2, "touching_fraction": 0.25}
# sha256 of images + annotations + categories of annotations.json for PARAMS, as generator
# version 1 (no stuff) wrote them: the things must not change when stuff is added. (It
# follows OpenCV's contour tracing; an OpenCV that traces differently changes it.)
THINGS_V1_SHA256 = "b7d1641659e7f121db6ef801172ef4e6561dcecb2a4f90be8285fe179be2acde"
SKY, GROUND = synthetic.stuff_category_id("sky"), synthetic.stuff_category_id("ground")


def _things_digest(coco: dict) -> str:
    text = json.dumps({k: coco[k] for k in ("images", "annotations", "categories")},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _ids(root: Path, file_name: str) -> np.ndarray:
    return rgb_to_id(_pixels(root / synthetic.PANOPTIC_DIR / file_name))


def _ann_mask(ann: dict, height: int, width: int) -> np.ndarray:
    seg = ann["segmentation"]
    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    elif isinstance(seg["counts"], list):
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        rle = {"size": seg["size"], "counts": seg["counts"].encode()}
    return mask_utils.decode(rle).astype(bool)


def _load(root: Path) -> tuple[dict, dict]:
    return (json.loads((root / synthetic.ANNOTATIONS_JSON).read_text()),
            json.loads((root / synthetic.PANOPTIC_JSON).read_text()))


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[bool, Path]:
    """The same scenes generated with stuff (True) and without (False)."""
    base = tmp_path_factory.mktemp("synthetic_stuff")
    roots = {stuff: base / f"stuff_{stuff}" for stuff in (True, False)}
    for stuff, root in roots.items():
        synthetic.generate(root, {**PARAMS, "stuff": stuff})
    return roots


# --------------------------------------------------------------------------- the things

def test_things_are_the_same_with_and_without_stuff(datasets):
    with_stuff, _ = _load(datasets[True])
    without, _ = _load(datasets[False])
    assert _things_digest(with_stuff) == _things_digest(without) == THINGS_V1_SHA256
    assert with_stuff["info"]["params"]["stuff"] is True
    assert without["info"]["params"]["stuff"] is False
    assert with_stuff["info"]["params_hash"] != without["info"]["params_hash"]
    assert [c["id"] for c in with_stuff["categories"]] == [1, 2, 3, 4]


def test_only_background_pixels_change(datasets):
    coco, panoptic = _load(datasets[True])
    changed_background = 0
    for ann in panoptic["annotations"]:
        ids = _ids(datasets[True], ann["file_name"])
        on = _pixels(datasets[True] / "images" / ann["file_name"])
        off = _pixels(datasets[False] / "images" / ann["file_name"])
        things = (ids > 0) & (ids < synthetic.STUFF_SEGMENT_BASE)
        assert np.array_equal(on[things], off[things]), ann["image_id"]
        background = ~things
        changed_background += (on[background] != off[background]).any(axis=1).mean() > 0.5
    assert changed_background == len(coco["images"])


# --------------------------------------------------------------------------- the export

def test_panoptic_json_lists_things_then_stuff(datasets):
    coco, panoptic = _load(datasets[True])
    assert panoptic["categories"] == [{**c, "isthing": 1} for c in coco["categories"]] + [
        {"id": SKY, "name": "sky", "supercategory": "scene", "isthing": 0},
        {"id": GROUND, "name": "ground", "supercategory": "scene", "isthing": 0}]
    assert (SKY, GROUND) == (5, 6)
    assert panoptic["images"] == coco["images"]
    assert panoptic["info"]["params_hash"] == coco["info"]["params_hash"]
    _, plain = _load(datasets[False])
    assert [c["isthing"] for c in plain["categories"]] == [1, 1, 1, 1]


def _check_segments(root: Path, coco: dict, ann: dict, image: dict) -> np.ndarray:
    """Each listed segment matches its PNG pixels; returns the id map."""
    ids = _ids(root, ann["file_name"])
    assert ids.shape == (image["height"], image["width"])
    listed = [s["id"] for s in ann["segments_info"]]
    assert len(listed) == len(set(listed))
    assert set(np.unique(ids).tolist()) - {0} == set(listed), image["id"]
    for segment in ann["segments_info"]:
        rle = mask_utils.encode(np.asfortranarray((ids == segment["id"]).astype(np.uint8)))
        assert segment["area"] == int(mask_utils.area(rle)) > 0
        assert segment["bbox"] == pytest.approx(mask_utils.toBbox(rle).tolist())
    return ids


def test_thing_segments_are_the_masks_as_painted(datasets):
    """A thing segment is its annotation's mask less what upper annotations took; the
    annotation id is the segment id; crowds stay crowds."""
    root = datasets[True]
    coco, panoptic = _load(root)
    images = {im["id"]: im for im in coco["images"]}
    crowd_segments = 0
    for ann in panoptic["annotations"]:
        image = images[ann["image_id"]]
        ids = _check_segments(root, coco, ann, image)
        segments = {s["id"]: s for s in ann["segments_info"]}
        upper = np.zeros(ids.shape, bool)
        for inst in reversed([a for a in coco["annotations"] if a["image_id"] == image["id"]]):
            mask = _ann_mask(inst, image["height"], image["width"])
            expected = mask & ~upper
            assert np.array_equal(ids == inst["id"], expected), (image["id"], inst["id"])
            segment = segments[inst["id"]]
            assert (segment["category_id"], segment["iscrowd"]) == \
                (inst["category_id"], inst["iscrowd"])
            crowd_segments += segment["iscrowd"]
            upper |= mask
    assert crowd_segments == sum(a["iscrowd"] for a in coco["annotations"]) > 0


def test_stuff_fills_the_background_sky_above_ground(datasets):
    root = datasets[True]
    coco, panoptic = _load(root)
    images = {im["id"]: im for im in coco["images"]}
    for ann in panoptic["annotations"]:
        image = images[ann["image_id"]]
        ids = _check_segments(root, coco, ann, image)
        assert (ids != 0).all(), f"void pixels in image {image['id']}"
        things = np.zeros(ids.shape, bool)
        for inst in coco["annotations"]:
            if inst["image_id"] == image["id"]:
                things |= _ann_mask(inst, image["height"], image["width"])
        stuff = {s["category_id"]: ids == s["id"] for s in ann["segments_info"]
                 if s["category_id"] in (SKY, GROUND)}
        assert set(stuff) == {SKY, GROUND}, image["id"]
        assert {s["id"] for s in ann["segments_info"] if s["category_id"] in stuff} == \
            {synthetic.STUFF_SEGMENT_BASE + SKY, synthetic.STUFF_SEGMENT_BASE + GROUND}
        assert not (stuff[SKY] & things).any() and not (stuff[GROUND] & things).any()
        assert np.array_equal(stuff[SKY] | stuff[GROUND], ~things)
        rows = np.arange(ids.shape[0])[:, None]
        lowest_sky = np.where(stuff[SKY], rows, -1).max(axis=0)
        highest_ground = np.where(stuff[GROUND], rows, ids.shape[0]).min(axis=0)
        assert (lowest_sky < highest_ground).all(), image["id"]


def test_without_stuff_the_background_is_void(datasets):
    root = datasets[False]
    coco, panoptic = _load(root)
    images = {im["id"]: im for im in coco["images"]}
    for ann in panoptic["annotations"]:
        ids = _check_segments(root, coco, ann, images[ann["image_id"]])
        assert all(s["category_id"] <= 4 for s in ann["segments_info"])
        assert (ids == 0).any()


def _read_panoptic(root: Path) -> tuple:
    config = SourceConfig.from_params({
        "type": "coco_panoptic", "root": str(root), "annotations": synthetic.PANOPTIC_JSON,
        "masks": synthetic.PANOPTIC_DIR, "images": synthetic.IMAGE_DIR, "workers": 0})
    report = QualityReport("coco_panoptic", "fail")
    return read_source(config, report), report


def test_export_round_trips_through_the_panoptic_reader_and_writer(datasets, tmp_path):
    root = datasets[True]
    _, panoptic = _load(root)
    tables, report = _read_panoptic(root)
    assert not sum(report.dropped["images"].values())
    assert not sum(report.dropped["annotations"].values())
    check_tables(tables.images, tables.instances, tables.categories, tables.stuff_segments)
    segments = pd.concat([tables.instances, tables.stuff_segments], ignore_index=True)
    written = write_panoptic(tables.images, segments, tables.categories, tmp_path / "png",
                             tmp_path / "panoptic.json")
    by_image = {a["image_id"]: a for a in written["annotations"]}
    for ann in panoptic["annotations"]:
        again = by_image[ann["image_id"]]
        assert np.array_equal(rgb_to_id(_pixels(tmp_path / "png" / again["file_name"])),
                              _ids(root, ann["file_name"]))
        assert sorted(again["segments_info"], key=itemgetter("id")) == \
            sorted(({**s, "bbox": [float(v) for v in s["bbox"]]}
                    for s in ann["segments_info"]), key=itemgetter("id"))


def test_export_scores_pq_one_against_itself(datasets):
    root = datasets[True]
    json_path, folder = root / synthetic.PANOPTIC_JSON, root / synthetic.PANOPTIC_DIR
    result = pq_from_files(json_path, folder, json_path, folder)
    for group in ("all", "things", "stuff"):
        assert result[group]["pq"] == result[group]["sq"] == result[group]["rq"] == 1.0
    assert result["stuff"]["n"] == 2 and result["things"]["n"] == 4


# --------------------------------------------------------------------------- ingestion

def _ingest(root: Path, **synthetic_params) -> tuple:
    config = SourceConfig.from_params({"type": "synthetic", "root": str(root), "workers": 0,
                                       "synthetic": {**PARAMS, **synthetic_params}})
    report = QualityReport("synthetic", "fail")
    return read_source(config, report), report


def test_ingestion_reads_instances_as_coco_and_stuff_from_the_export(datasets):
    root = datasets[True]
    tables, report = _ingest(root)
    assert not sum(report.dropped["images"].values())
    check_tables(tables.images, tables.instances, tables.categories, tables.stuff_segments)
    as_coco = read_source(SourceConfig.from_params({"type": "coco", "root": str(root),
                                                    "workers": 0}),
                          QualityReport("coco", "fail"))
    pd.testing.assert_frame_equal(tables.instances, as_coco.instances)
    pd.testing.assert_frame_equal(tables.images, as_coco.images)
    categories = tables.categories.set_index("category_id")
    assert categories["isthing"].to_dict() == {1: True, 2: True, 3: True, 4: True,
                                               SKY: False, GROUND: False}
    assert categories.loc[[SKY, GROUND], "name"].tolist() == ["sky", "ground"]
    assert label_mapping(tables.categories) == {1: 1, 2: 2, 3: 3, 4: 4}
    assert stuff_mapping(tables.categories) == {SKY: 1, GROUND: 2}

    stuff = tables.stuff_segments
    assert len(stuff) == 2 * len(tables.images)
    assert set(stuff["category_id"]) == {SKY, GROUND} and not stuff["iscrowd"].any()
    assert (stuff["annotation_id"] == synthetic.STUFF_SEGMENT_BASE + stuff["category_id"]).all()
    assert stuff["instance_id"].tolist() == [
        coco_panoptic.instance_id(i, s) for i, s in zip(stuff["image_id"], stuff["annotation_id"])]
    assert not set(stuff["instance_id"]) & set(tables.instances["instance_id"])
    for image in tables.images.itertuples(index=False):
        h, w = image.height, image.width
        things = tables.instances[tables.instances["image_id"] == image.image_id]
        segments = stuff[stuff["image_id"] == image.image_id]
        thing_masks = decode_strings(things["rle"].tolist(), h, w).astype(bool)
        stuff_masks = decode_strings(segments["rle"].tolist(), h, w).astype(bool)
        covered = thing_masks.any(axis=0) if len(things) else np.zeros((h, w), bool)
        assert not (stuff_masks.any(axis=0) & covered).any(), image.image_id
        assert np.array_equal(stuff_masks.sum(axis=0) + covered, np.ones((h, w))), \
            image.image_id
        assert segments["area"].tolist() == stuff_masks.sum(axis=(1, 2)).tolist()


def test_ingestion_without_stuff_has_the_things_only(datasets):
    tables, _ = _ingest(datasets[False], stuff=False)
    assert tables.stuff_segments.empty
    assert tables.categories["category_id"].tolist() == [1, 2, 3, 4]
    assert tables.categories["isthing"].all()
    with_stuff, _ = _ingest(datasets[True])
    pd.testing.assert_frame_equal(tables.instances, with_stuff.instances)


def test_an_unusable_panoptic_png_drops_its_image(tmp_path):
    root = tmp_path / "shapes"
    synthetic.generate(root, {**PARAMS, "num_images": 3, "empty_fraction": 0.0})
    (root / synthetic.PANOPTIC_DIR / "000002.png").write_bytes(b"not a png")
    config = SourceConfig.from_params({"type": "synthetic", "root": str(root), "workers": 0})
    report = QualityReport("synthetic", "skip")
    tables = synthetic.read(config, report)
    assert tables.images["image_id"].tolist() == [1, 3]
    assert set(tables.instances["image_id"]) == {1, 3} == set(tables.stuff_segments["image_id"])
    assert report.dropped["images"]["panoptic_png_unreadable"] == 1
    assert report.dropped["annotations"]["image_dropped"] >= 1


# --------------------------------------------------------------------------- files

def test_a_missing_panoptic_png_triggers_regeneration(tmp_path):
    root = tmp_path / "shapes"
    params = {**PARAMS, "num_images": 2}
    manifest = synthetic.generate(root, params)
    png = root / synthetic.PANOPTIC_DIR / "000002.png"
    before = png.read_bytes()
    png.unlink()
    assert synthetic.generate(root, params) == manifest
    assert png.read_bytes() == before


def test_manifest_counts_stuff(datasets):
    manifest = synthetic.generate(datasets[True], {**PARAMS, "stuff": True})
    assert manifest["num_categories"] == 6
    assert manifest["num_stuff_segments"] == 2 * PARAMS["num_images"]
    plain = synthetic.generate(datasets[False], {**PARAMS, "stuff": False})
    assert plain["num_categories"] == 4 and plain["num_stuff_segments"] == 0


def test_stuff_must_be_a_boolean():
    with pytest.raises(ValueError, match="stuff must be true or false"):
        synthetic.resolve_params({"stuff": "yes"})
    assert synthetic.resolve_params({})["stuff"] is True
    assert SourceConfig.from_params({"synthetic": {"stuff": False}}).synthetic.stuff is False
