"""COCO panoptic source: PNG segments -> tables -> PNG bit for bit, PQ 1 for the ground
truth written back, and every hostile input named under both policies (skip and fail)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from instseg_pipeline.data.config import SourceConfig
from instseg_pipeline.data.masks import id_to_rgb, rgb_to_id
from instseg_pipeline.data.panoptic import write_panoptic
from instseg_pipeline.data.quality import IngestionError, QualityReport
from instseg_pipeline.data.sources.registry import read_source
from instseg_pipeline.data.tables import check_tables, label_mapping
from instseg_pipeline.evaluation.panoptic import pq_from_files


def _read(root: Path, annotations: str, masks: str, images: str, on_invalid: str = "skip"):
    config = SourceConfig.from_params({
        "type": "coco_panoptic", "root": str(root), "annotations": annotations,
        "masks": masks, "images": images, "on_invalid": on_invalid, "workers": 0})
    report = QualityReport("coco_panoptic", on_invalid)
    return read_source(config, report), report


def _png_ids(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return rgb_to_id(np.asarray(image.convert("RGB")))


# --------------------------------------------------------------------------- coco128
@pytest.mark.parametrize("split", ["train", "val"])
def test_coco128_segments_round_trip_and_score_pq_one(coco128_dir, tmp_path, split):
    """Every segment's pixels: PNG -> tables -> PNG bit-exactly; written back as
    predictions, the ground truth scores PQ = SQ = RQ = 1 for things, stuff and all."""
    gt_json = coco128_dir / f"annotations/panoptic_{split}2017.json"
    gt_folder = coco128_dir / f"annotations/panoptic_{split}2017"
    tables, report = _read(coco128_dir, f"annotations/panoptic_{split}2017.json",
                           f"annotations/panoptic_{split}2017", f"{split}2017")
    assert sum(report.dropped["images"].values()) == 0
    assert sum(report.dropped["annotations"].values()) == 0
    check_tables(tables.images, tables.instances, tables.categories, tables.stuff_segments)
    things = set(tables.categories.loc[tables.categories["isthing"], "category_id"])
    assert set(tables.instances["category_id"]) <= things
    assert not set(tables.stuff_segments["category_id"]) & things
    assert len(tables.stuff_segments) > 0 and tables.instances["iscrowd"].any()
    assert set(label_mapping(tables.categories)) == things  # models learn the things only

    expected = json.loads(gt_json.read_text())
    listed = sum(len(a["segments_info"]) for a in expected["annotations"])
    assert len(tables.instances) + len(tables.stuff_segments) == listed

    out = tmp_path / "written"
    segments = pd.concat([tables.instances, tables.stuff_segments], ignore_index=True)
    written = write_panoptic(tables.images, segments, tables.categories, out,
                             tmp_path / "written.json")
    for ann in expected["annotations"]:
        name = Path(ann["file_name"]).name
        np.testing.assert_array_equal(_png_ids(out / name), _png_ids(gt_folder / name),
                                      err_msg=f"{name} differs after the round trip")
    assert len(written["annotations"]) == len(expected["annotations"])
    pq = pq_from_files(gt_json, gt_folder, tmp_path / "written.json", out)
    for group in ("all", "things", "stuff"):
        assert pq[group]["n"] > 0
        assert pq[group]["pq"] == pq[group]["sq"] == pq[group]["rq"] == 1.0, group


# --------------------------------------------------------------------------- hostile
THING, STUFF = 1, 2
CATEGORIES = [{"id": THING, "name": "disk", "supercategory": "shape", "isthing": 1},
              {"id": STUFF, "name": "sky", "supercategory": "background", "isthing": 0}]


def _id_map(height: int = 16, width: int = 20) -> np.ndarray:
    """Segment 7 (a thing square), segment 300 (stuff, the top rows, id > 255), void."""
    ids = np.zeros((height, width), dtype=np.int64)
    ids[:4] = 300
    ids[8:12, 5:10] = 7
    return ids


def _segments(ids: np.ndarray) -> list[dict]:
    return [{"id": 7, "category_id": THING, "iscrowd": 0, "area": int((ids == 7).sum()),
             "bbox": [5, 8, 5, 4]},
            {"id": 300, "category_id": STUFF, "iscrowd": 0, "area": int((ids == 300).sum()),
             "bbox": [0, 0, 20, 4]}]


def _dataset(root: Path) -> dict:
    """Two 20x16 images with the same segments: images/, panoptic/ and panoptic.json."""
    (root / "images").mkdir(parents=True)
    (root / "panoptic").mkdir()
    data = {"images": [], "annotations": [], "categories": CATEGORIES}
    for image_id in (1, 2):
        ids = _id_map()
        Image.fromarray(np.full((16, 20, 3), 90, np.uint8)).save(
            root / "images" / f"{image_id}.png")
        Image.fromarray(id_to_rgb(ids)).save(root / "panoptic" / f"{image_id}.png")
        data["images"].append({"id": image_id, "file_name": f"{image_id}.png",
                               "width": 20, "height": 16})
        data["annotations"].append({"image_id": image_id, "file_name": f"{image_id}.png",
                                    "segments_info": _segments(ids)})
    return data


def _write(root: Path, data: dict) -> None:
    (root / "panoptic.json").write_text(json.dumps(data))


def _paint(root: Path, ids: np.ndarray, name: str = "2.png") -> None:
    Image.fromarray(id_to_rgb(ids)).save(root / "panoptic" / name)


def _missing_png(root, data):
    (root / "panoptic" / "2.png").unlink()


def _segment_missing_from_png(root, data):
    data["annotations"][1]["segments_info"].append(
        {"id": 9, "category_id": THING, "iscrowd": 0, "area": 4, "bbox": [0, 0, 2, 2]})


def _extra_png_segment(root, data):
    ids = _id_map()
    ids[14:, 15:] = 55
    _paint(root, ids)


def _wrong_size_png(root, data):
    _paint(root, _id_map(12, 20))


def _unknown_category(root, data):
    data["annotations"][1]["segments_info"][0]["category_id"] = 99


def _duplicate_segment_ids(root, data):
    data["annotations"][1]["segments_info"][1]["id"] = 7


def _area_mismatch(root, data):
    data["annotations"][1]["segments_info"][0]["area"] = 21


# (edit, what is dropped, reason, words the message must hold, segments left of image 2)
CASES = {
    "png missing": (_missing_png, "images", "panoptic_png_missing",
                    ["image 2", "2.png", "not found"], None),
    "segment missing from the png": (_segment_missing_from_png, "annotations",
                                     "segment_missing_from_png",
                                     ["segment 9 of image 2", "no pixel"], {7, 300}),
    "extra png segment": (_extra_png_segment, "annotations", "segment_missing_from_json",
                          ["segment 55 of image 2", "not listed in the json"], {7, 300}),
    "wrong-size png": (_wrong_size_png, "images", "panoptic_png_size",
                       ["image 2", "20x12", "the image is 20x16"], None),
    "unknown category": (_unknown_category, "annotations", "unknown_category",
                         ["segment 7 of image 2", "unknown category_id 99"], {300}),
    "duplicate segment ids": (_duplicate_segment_ids, "images", "duplicate_segment_id",
                              ["image 2", "duplicate segment ids 7"], None),
    "area mismatch": (_area_mismatch, "annotations", "segment_area_mismatch",
                      ["segment 7 of image 2", "json area 21", "20 pixels"], {300}),
}


def _hostile(root: Path, case: str, on_invalid: str):
    """Read the two-image dataset after the case's edit."""
    data = _dataset(root)
    CASES[case][0](root, data)
    _write(root, data)
    return _read(root, "panoptic.json", "panoptic", "images", on_invalid=on_invalid)


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_panoptic_input_is_named_and_skipped(tmp_path, case):
    _, kind, reason, words, left = CASES[case]
    tables, report = _hostile(tmp_path, case, "skip")
    assert report.dropped[kind] == {reason: 1}
    message = report.examples[reason][0]
    for word in words:
        assert word in message, (word, message)
    segments = pd.concat([tables.instances, tables.stuff_segments])
    assert set(segments.loc[segments["image_id"] == 1, "annotation_id"]) == {7, 300}
    if left is None:  # the whole image goes
        assert tables.images["image_id"].tolist() == [1]
    else:
        assert tables.images["image_id"].tolist() == [1, 2]
        assert set(segments.loc[segments["image_id"] == 2, "annotation_id"]) == left


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_panoptic_input_fails_naming_it(tmp_path, case):
    words = CASES[case][3]
    with pytest.raises(IngestionError) as error:
        _hostile(tmp_path, case, "fail")
    for word in words:
        assert word in str(error.value)


def test_clean_dataset_splits_things_and_stuff(tmp_path):
    data = _dataset(tmp_path)
    _write(tmp_path, data)
    tables, report = _read(tmp_path, "panoptic.json", "panoptic", "images")
    assert not sum(report.dropped["images"].values()) + sum(report.dropped["annotations"].values())
    assert tables.instances["annotation_id"].tolist() == [7, 7]
    assert tables.stuff_segments["annotation_id"].tolist() == [300, 300]
    assert tables.instances["instance_id"].tolist() == [(1 << 24) | 7, (2 << 24) | 7]
    assert tables.instances["bbox"].tolist()[0] == [5.0, 8.0, 5.0, 4.0]
    assert tables.stuff_segments["area"].tolist() == [80, 80]


@pytest.mark.parametrize("edit, words", [
    (lambda d: d["annotations"].append(copy.deepcopy(d["annotations"][0])),
     ["image 1 has two panoptic annotations"]),
    (lambda d: d["annotations"][0].update(image_id=5), ["unknown image_id 5"]),
    (lambda d: d["categories"].append(dict(CATEGORIES[0])), ["duplicate category ids 1"]),
])
def test_structural_damage_always_fails(tmp_path, edit, words):
    data = _dataset(tmp_path)
    edit(data)
    _write(tmp_path, data)
    with pytest.raises(IngestionError) as error:
        _read(tmp_path, "panoptic.json", "panoptic", "images")
    for word in words:
        assert word in str(error.value)
