"""COCO source: real coco128 numbers and every kind of bad input (skip and fail modes)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from coco_fixtures import coco_params, decode, make_coco, write_json
from PIL import Image

from instseg_pipeline.data.config import SourceConfig
from instseg_pipeline.data.quality import IngestionError, QualityReport
from instseg_pipeline.data.sources import coco
from instseg_pipeline.data.tables import check_tables, tables_to_coco


def _read(params: dict, on_invalid: str = "skip"):
    report = QualityReport("coco", on_invalid)
    tables = coco.read(SourceConfig.from_params(params), report)
    return tables, report.summary(tables.images, tables.instances)


# --- real data -------------------------------------------------------------------------

def test_coco128_counts_and_bit_exact_masks(coco128_dir):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    params = coco_params(coco128_dir, annotations="annotations/instances_train2017.json",
                         images="train2017")
    tables, summary = _read(params)
    assert summary["images"] == 128
    assert summary["instances"] == 939
    assert summary["crowd_instances"] == 10
    assert summary["images_without_instances"] == 2
    assert summary["notes"] == {"converted_mode_L": 1}
    assert summary["dropped_total"] == {"images": 0, "annotations": 0}
    check_tables(tables.images, tables.instances, tables.categories)

    reference = COCO(str(coco128_dir / "annotations/instances_train2017.json"))
    sizes = tables.images.set_index("image_id")[["height", "width"]]
    for row in tables.instances.itertuples(index=False):
        ann = reference.anns[row.instance_id]
        assert row.image_id == ann["image_id"] and row.category_id == ann["category_id"]
        height, width = sizes.loc[row.image_id]
        expected = reference.annToMask(ann)
        assert np.array_equal(decode(row.rle, height, width), expected), row.instance_id
        assert row.area == int(mask_utils.area(reference.annToRLE(ann)))
    non_contiguous = sorted(tables.categories["category_id"])
    assert non_contiguous[-1] == 90 and len(non_contiguous) == 80


def test_tables_round_trip_to_coco(tmp_path):
    make_coco(tmp_path)
    tables, _ = _read(coco_params(tmp_path))
    gt = tables_to_coco(tables.images, tables.instances, tables.categories)
    assert sorted(gt.getImgIds()) == [1, 2, 3]
    assert gt.anns[999]["iscrowd"] == 1
    mask = gt.annToMask(gt.anns[100])
    assert mask.sum() == tables.instances.set_index("instance_id").loc[100, "area"]


def test_images_without_annotations_and_grayscale_are_kept(tmp_path):
    data = make_coco(tmp_path)
    Image.new("L", (40, 30), 128).save(tmp_path / "images" / "gray.png")
    data["images"].append({"id": 50, "file_name": "gray.png", "width": 40, "height": 30})
    write_json(tmp_path, data)
    tables, summary = _read(coco_params(tmp_path))
    assert 50 in set(tables.images["image_id"])
    assert summary["images_without_instances"] == 1
    assert summary["notes"]["converted_mode_L"] == 1


def test_multipart_polygon_and_compressed_rle(tmp_path):
    from pycocotools import mask as mask_utils

    data = make_coco(tmp_path)
    data["annotations"][0]["segmentation"] = [[1, 1, 5, 1, 5, 5, 1, 5],
                                              [30, 20, 36, 20, 36, 26, 30, 26]]
    bitmap = np.zeros((30, 40), dtype=np.uint8)
    bitmap[3:9, 10:14] = 1
    rle = mask_utils.encode(np.asfortranarray(bitmap))
    data["annotations"][1]["segmentation"] = {"size": [30, 40],
                                              "counts": rle["counts"].decode()}
    write_json(tmp_path, data)
    tables, _ = _read(coco_params(tmp_path))
    by_id = tables.instances.set_index("instance_id")
    two_parts = decode(by_id.loc[100, "rle"], 30, 40)
    assert two_parts[:10, :10].any() and two_parts[18:, 28:].any()
    assert np.array_equal(decode(by_id.loc[101, "rle"], 30, 40), bitmap)


# --- always fatal: the json is inconsistent ----------------------------------------------

@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["annotations"].__setitem__(0, {**d["annotations"][0], "image_id": 77}),
     "annotation 100 refers to unknown image_id 77"),
    (lambda d: d["annotations"].__setitem__(0, {**d["annotations"][0], "category_id": 5}),
     "annotation 100 refers to unknown category_id 5"),
    (lambda d: d["annotations"].append(dict(d["annotations"][0])), "duplicate annotation ids 100"),
    (lambda d: d["images"].append(dict(d["images"][0])), "duplicate image ids 1"),
    (lambda d: d["categories"].append(dict(d["categories"][0])), "duplicate category ids 3"),
])
def test_inconsistent_json_fails_even_in_skip_mode(tmp_path, mutate, message):
    data = make_coco(tmp_path)
    mutate(data)
    path = write_json(tmp_path, data)
    with pytest.raises(IngestionError) as info:
        _read(coco_params(tmp_path))
    assert message in str(info.value) and str(path) in str(info.value)


def test_missing_and_broken_json(tmp_path):
    with pytest.raises(IngestionError, match="annotation file not found"):
        _read(coco_params(tmp_path))
    (tmp_path / "annotations.json").write_text("{not json")
    with pytest.raises(IngestionError, match="not valid JSON"):
        _read(coco_params(tmp_path))


# --- bad images: skipped with a count, or fatal with on_invalid=fail ---------------------

def _truncate(path):
    noise = np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path.with_suffix(".jpg"), quality=95)
    blob = path.with_suffix(".jpg").read_bytes()
    path.write_bytes(blob[: int(len(blob) * 0.8)])  # header intact, pixel data cut


BAD_IMAGES = {
    "missing_file": lambda p: p.unlink(),
    "empty_file": lambda p: p.write_bytes(b""),
    "not_an_image": lambda p: p.write_text("this is a text file, not a picture"),
    "corrupt": _truncate,
    "size_mismatch": lambda p: Image.new("RGB", (41, 30)).save(p, format="PNG"),
}


@pytest.mark.parametrize("reason", sorted(BAD_IMAGES))
def test_bad_image_is_skipped_and_counted(tmp_path, reason):
    make_coco(tmp_path)
    BAD_IMAGES[reason](tmp_path / "images" / "img2.png")
    tables, summary = _read(coco_params(tmp_path))
    assert summary["dropped"]["images"] == {reason: 1}
    assert summary["dropped"]["annotations"] == {"image_dropped": 2}
    assert 2 not in set(tables.images["image_id"])
    assert not tables.instances["image_id"].eq(2).any()


@pytest.mark.parametrize("reason", sorted(BAD_IMAGES))
def test_bad_image_fails_in_fail_mode_naming_id_and_file(tmp_path, reason):
    make_coco(tmp_path)
    BAD_IMAGES[reason](tmp_path / "images" / "img2.png")
    with pytest.raises(IngestionError) as info:
        _read(coco_params(tmp_path), on_invalid="fail")
    assert "image 2" in str(info.value) and "img2.png" in str(info.value)


def test_truncated_file_passes_header_check_but_not_decode(tmp_path):
    make_coco(tmp_path)
    _truncate(tmp_path / "images" / "img2.png")
    _, summary = _read(coco_params(tmp_path, verify_images="header"))
    assert summary["dropped_total"]["images"] == 0
    _, summary = _read(coco_params(tmp_path, verify_images="decode"))
    assert summary["dropped"]["images"] == {"corrupt": 1}


def test_image_over_pixel_limit_is_rejected_from_its_header(tmp_path):
    make_coco(tmp_path)
    _, summary = _read(coco_params(tmp_path, max_image_pixels=40 * 30 - 1))
    assert summary["dropped"]["images"] == {"too_many_pixels": 3}
    _, summary = _read(coco_params(tmp_path, max_image_pixels=40 * 30))
    assert summary["dropped_total"]["images"] == 0


def test_exif_orientation_policy(tmp_path):
    data = make_coco(tmp_path, n_images=1)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: the 40x30 file displays as 30x40
    Image.new("RGB", (40, 30)).save(tmp_path / "images" / "img1.png", exif=exif)
    # Annotations drawn on the displayed (rotated) picture: EXIF applied, nothing noted.
    data["images"][0].update(width=30, height=40)
    data["annotations"] = [a for a in data["annotations"] if not a["iscrowd"]]
    write_json(tmp_path, data)
    _, summary = _read(coco_params(tmp_path))
    assert summary["dropped_total"]["images"] == 0 and "exif_ignored" not in summary["notes"]
    # Annotations drawn on the raw pixels: EXIF ignored for this image, counted.
    data["images"][0].update(width=40, height=30)
    write_json(tmp_path, data)
    _, summary = _read(coco_params(tmp_path))
    assert summary["dropped_total"]["images"] == 0 and summary["notes"]["exif_ignored"] == 1


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16"])
def test_image_modes_are_accepted_and_noted(tmp_path, mode):
    make_coco(tmp_path, n_images=1)
    target = tmp_path / "images" / "img1.png"
    if mode == "CMYK":
        Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(target.with_suffix(".jpg"))
        target.write_bytes(target.with_suffix(".jpg").read_bytes())
    elif mode == "I;16":
        Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16)).save(target)
    else:
        Image.new(mode, (40, 30)).save(target)
    _tables, summary = _read(coco_params(tmp_path))
    assert summary["dropped_total"]["images"] == 0
    assert len(summary["notes"]) == 1 and next(iter(summary["notes"])).startswith(
        "converted_mode_")


# --- bad annotations ----------------------------------------------------------------------

NAN = float("nan")
BAD_ANNOTATIONS = {
    "polygon_too_few_points": {"segmentation": [[1, 1, 5, 1]]},
    "polygon_odd_coordinates": {"segmentation": [[1, 1, 5, 1, 5, 5, 1]]},
    "polygon_nonfinite": {"segmentation": [[1, 1, NAN, 1, 5, 5, 1, 5]]},
    "polygon_empty": {"segmentation": [], "bbox": None},  # with a bbox: box-only
    "rle_counts_sum": {"segmentation": {"size": [30, 40], "counts": [10, 20, 30]}},
    "rle_size_mismatch": {"segmentation": {"size": [31, 40], "counts": [31 * 40]}},
    "bad_bbox": {"bbox": [1, 1, NAN, 4]},
    "empty_mask": {"segmentation": [[1, 1, 5, 1, 9, 1]]},
}


@pytest.mark.parametrize("reason", sorted(BAD_ANNOTATIONS) + ["bbox_non_positive", "inf"])
def test_bad_annotation_is_skipped_and_counted(tmp_path, reason):
    data = make_coco(tmp_path)
    change = {"bbox_non_positive": {"bbox": [1, 1, 0, 4]},
              "inf": {"segmentation": [[1, 1, math.inf, 1, 5, 5, 1, 5]]}}.get(
        reason, BAD_ANNOTATIONS.get(reason))
    data["annotations"][3].update(change)
    write_json(tmp_path, data)
    tables, summary = _read(coco_params(tmp_path))
    expected = {"bbox_non_positive": "bad_bbox", "inf": "polygon_nonfinite"}.get(reason, reason)
    assert summary["dropped"]["annotations"] == {expected: 1}
    assert 201 not in set(tables.instances["instance_id"])
    assert summary["instances"] == len(data["annotations"]) - 1


@pytest.mark.parametrize("reason", sorted(BAD_ANNOTATIONS))
def test_bad_annotation_fails_in_fail_mode_naming_ids(tmp_path, reason):
    data = make_coco(tmp_path)
    data["annotations"][3].update(BAD_ANNOTATIONS[reason])
    write_json(tmp_path, data)
    with pytest.raises(IngestionError) as info:
        _read(coco_params(tmp_path), on_invalid="fail")
    assert "annotation 201" in str(info.value) and "image 2" in str(info.value)


def test_annotations_of_an_unusable_image_record_are_counted(tmp_path):
    data = make_coco(tmp_path)
    data["images"][1]["width"] = -40  # image 2: the record itself is unusable
    write_json(tmp_path, data)
    tables, summary = _read(coco_params(tmp_path))
    assert summary["dropped"]["images"] == {"bad_image_record": 1}
    assert summary["dropped"]["annotations"] == {"image_dropped": 2}
    assert set(tables.images["image_id"]) == {1, 3}


def test_json_with_nan_literals_is_read_and_the_annotation_reported(tmp_path):
    """Strict JSON parsing fails on NaN (which json.dumps writes); the fallback reads the
    file and the NaN polygon is reported as its own annotation's problem."""
    data = make_coco(tmp_path)
    data["annotations"][0]["segmentation"] = [[1.0, 1.0, float("nan"), 5.0, 8.0, 8.0]]
    write_json(tmp_path, data)
    assert "NaN" in (tmp_path / "annotations.json").read_text()
    tables, summary = _read(coco_params(tmp_path))
    assert summary["dropped"]["annotations"] == {"polygon_nonfinite": 1}
    assert 100 not in set(tables.instances["instance_id"])


@pytest.mark.parametrize("mode", ["header", "decode"])
def test_checks_in_worker_processes_equal_checks_in_process(tmp_path, monkeypatch, mode):
    """The parallel image checks keep the order and the findings of the in-process ones."""
    from instseg_pipeline.data.sources import checks

    monkeypatch.setattr(checks, "PARALLEL_MIN_IMAGES", 2)
    make_coco(tmp_path, n_images=6)
    BAD_IMAGES["corrupt"](tmp_path / "images" / "img2.png")
    BAD_IMAGES["size_mismatch"](tmp_path / "images" / "img5.png")
    results = {}
    for workers in (0, 2):
        tables, summary = _read({**coco_params(tmp_path), "verify_images": mode,
                                 "workers": workers})
        results[workers] = (tables.images["image_id"].tolist(),
                            tables.instances["instance_id"].tolist(), summary["dropped"])
    assert results[0] == results[2]
    assert results[2][2]["images"] == ({"size_mismatch": 1} if mode == "header"
                                       else {"corrupt": 1, "size_mismatch": 1})
