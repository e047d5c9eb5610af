"""Hostile COCO input: far-out geometry, absurd vertex and run counts, malformed records.

Each case is refused before pycocotools allocates anything proportional to it, counted
under its own reason and named (annotation id, image id) in skip mode, and fatal with the
same naming in fail mode. The address-space guard turns a regression (pycocotools asked
for gigabytes) into a MemoryError or crash of this test instead of an OOM-killed machine.
"""
from __future__ import annotations

import numpy as np
import pytest
from coco_fixtures import coco_params, decode, make_coco, write_json
from memory_guard import address_space_limit
from pycocotools import mask as mask_utils

from instseg_pipeline.data import masks
from instseg_pipeline.data.config import SourceConfig
from instseg_pipeline.data.quality import IngestionError, QualityReport
from instseg_pipeline.data.sources import coco

H, W = 30, 40  # make_coco's image size


def _read(params: dict, on_invalid: str = "skip"):
    report = QualityReport("coco", on_invalid)
    with address_space_limit(2 << 30):
        tables = coco.read(SourceConfig.from_params(params), report)
    return tables, report.summary(tables.images, tables.instances)


def _zigzag(reps: int) -> list[list[float]]:
    """A polygon inside the margin box whose edges cross it again and again."""
    return [[-W, -H, 2 * W, 2 * H, -W, 2 * H, 2 * W, -H] * reps]


# case: (reason counted, change to annotation 201 of image 2)
HOSTILE = {
    "coordinate_1e12": ("polygon_out_of_bounds", {"segmentation": [[1, 1, 1e12, 1, 5, 5]]}),
    "coordinate_minus_1e12": ("polygon_out_of_bounds",
                              {"segmentation": [[1, 1, 5, 1, 5, -1e12, 1, 5]]}),
    "coordinate_beyond_float": ("polygon_out_of_bounds",
                                {"segmentation": [[1, 1, 10**400, 1, 5, 5]]}),
    "second_part_out": ("polygon_out_of_bounds",
                        {"segmentation": [[1, 1, 5, 1, 5, 5], [1, 1, 5, 1, 5, 3 * H]]}),
    "many_vertices": ("polygon_too_many_vertices",
                      {"segmentation": [[1.0, 1.0, 5.0, 1.0, 5.0, 5.0] *
                                        ((H + 1) * (W + 1) // 3 + 1)]}),
    "many_parts": ("polygon_too_many_vertices",
                   {"segmentation": [[1, 1, 5, 1, 5, 5]] * ((H + 1) * (W + 1) // 3 + 1)}),
    "long_boundary": ("polygon_too_long", {"segmentation": _zigzag(50)}),
    "many_listed_runs": ("rle_too_many_runs",
                         {"segmentation": {"size": [H, W],
                                           "counts": [0] * (H * W + 1) + [H * W]}}),
    "long_string": ("rle_too_many_runs",
                    {"segmentation": {"size": [H, W], "counts": "1" * (6 * (H * W + 1) + 1)}}),
    "many_decoded_runs": ("rle_too_many_runs",
                          {"segmentation": {"size": [H, W], "counts": "1" * 3000}}),
    "seven_char_run": ("rle_malformed",
                       {"segmentation": {"size": [H, W], "counts": "o" * 6 + "1"}}),
    "string_size": ("rle_malformed", {"segmentation": {"size": ["30", W], "counts": [H * W]}}),
    "lone_surrogate": ("rle_malformed", {"segmentation": {"size": [H, W], "counts": "\ud800"}}),
    # with a bbox, a null or empty segmentation is a box-only annotation (own tests)
    "null_segmentation": ("segmentation_malformed", {"segmentation": None, "bbox": None}),
    "bbox_1e12": ("bbox_out_of_bounds", {"bbox": [1, 1, 1e12, 4]}),
    "bbox_beyond_float": ("bad_bbox", {"bbox": [1, 1, 10**400, 4]}),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_annotation_is_skipped_counted_and_named(tmp_path, case, caplog):
    data = make_coco(tmp_path)
    reason, change = HOSTILE[case]
    data["annotations"][3].update(change)  # annotation 201 of image 2
    write_json(tmp_path, data)
    tables, summary = _read(coco_params(tmp_path))
    assert summary["dropped"]["annotations"] == {reason: 1}
    assert 201 not in set(tables.instances["instance_id"])
    assert summary["instances"] == len(data["annotations"]) - 1
    (message,) = summary["examples"][reason]
    assert "annotation 201" in message and "image 2" in message
    assert any("annotation 201" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_annotation_fails_in_fail_mode_naming_ids(tmp_path, case):
    data = make_coco(tmp_path)
    data["annotations"][3].update(HOSTILE[case][1])
    write_json(tmp_path, data)
    with pytest.raises(IngestionError) as info:
        _read(coco_params(tmp_path), on_invalid="fail")
    assert "annotation 201" in str(info.value) and "image 2" in str(info.value)


def test_geometry_near_the_image_is_kept_bit_exact(tmp_path):
    """Vertices and boxes up to one image size outside are legal and reach pycocotools
    unchanged: the kept mask is exactly what pycocotools makes of the original polygon."""
    data = make_coco(tmp_path)
    near = [[-W, -H, 2 * W, -H, 2 * W, 2 * H, 10, 2 * H, 10, 10]]
    data["annotations"][3].update(segmentation=near, bbox=[-W, -H, 3 * W, 3 * H])
    write_json(tmp_path, data)
    tables, summary = _read(coco_params(tmp_path))
    assert summary["dropped_total"]["annotations"] == 0
    row = tables.instances.set_index("instance_id").loc[201]
    expected = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(near, H, W)))
    assert np.array_equal(decode(row["rle"], H, W), expected)


def test_polygon_just_beyond_the_margin_is_out_of_bounds():
    inside = [[-W, 0, 2 * W, 0, 2 * W, 2 * H]]
    outside = [[-W - 0.01, 0, 2 * W, 0, 2 * W, 2 * H]]
    assert masks.segmentation_problem(inside, H, W) is None
    assert masks.segmentation_problem(outside, H, W)[0] == "polygon_out_of_bounds"


def test_vertex_limit_is_checked_before_any_coordinate_is_read():
    class Exploding(list):
        def __iter__(self):
            raise AssertionError("coordinates were read")

    part = Exploding([0.0] * (2 * (H + 1) * (W + 1) + 2))
    assert masks.segmentation_problem([part], H, W)[0] == "polygon_too_many_vertices"


def test_boundary_limit_matches_what_pycocotools_rasterises():
    """A polygon just under the boundary limit is kept and converted; its count is
    pycocotools' own (same rounding), so the limit bounds the real allocation."""
    reps = 1
    while masks.boundary_points(_zigzag(reps + 1)) <= masks.max_boundary_points(H, W):
        reps += 1
    assert masks.segmentation_problem(_zigzag(reps), H, W) is None
    assert masks.segmentation_problem(_zigzag(reps + 1), H, W)[0] == "polygon_too_long"
    rle = masks.segmentation_to_rle(_zigzag(reps), H, W)
    expected = mask_utils.merge(mask_utils.frPyObjects(_zigzag(reps), H, W))
    assert rle["counts"] == expected["counts"]


def test_declared_image_size_over_the_pixel_limit_drops_it_before_conversion(tmp_path):
    """Every geometry limit derives from the declared size: a record declaring a huge
    image is dropped first, so its annotations are never converted at that size."""
    data = make_coco(tmp_path)
    data["images"][1].update(width=100_000, height=100_000)
    data["annotations"][2]["segmentation"] = [[1, 1, 90_000, 1, 90_000, 90_000],
                                              [5, 5, 80_000, 5, 80_000, 80_000]]
    write_json(tmp_path, data)
    tables, summary = _read(coco_params(tmp_path))
    assert summary["dropped"]["images"] == {"too_many_pixels": 1}
    assert summary["dropped"]["annotations"] == {"image_dropped": 2}
    assert "image 2" in summary["examples"]["too_many_pixels"][0]
    assert set(tables.images["image_id"]) == {1, 3}


@pytest.mark.parametrize("mutate, reason, named", [
    (lambda d: d["images"].append(7), "bad_image_record", "images[3]"),
    (lambda d: d["images"].append({"id": "4", "file_name": "x.png", "width": 4,
                                   "height": 4}), "bad_image_record", "images[3]"),
    (lambda d: d["images"].append({"id": 2**70, "file_name": "x.png", "width": 4,
                                   "height": 4}), "bad_image_record", "images[3]"),
    (lambda d: d["annotations"].append([1, 2]), "bad_annotation_record", "annotations[7]"),
    (lambda d: d["annotations"].append({"id": [5], "image_id": 1, "category_id": 3}),
     "bad_annotation_record", "annotations[7]"),
    (lambda d: d["annotations"].append({"id": 5, "image_id": "1", "category_id": 3}),
     "bad_annotation_record", "annotation 5"),
    (lambda d: d["annotations"].append({"id": 5, "image_id": 1, "category_id": True}),
     "bad_annotation_record", "annotation 5"),
])
def test_malformed_records_are_skipped_and_named(tmp_path, mutate, reason, named):
    data = make_coco(tmp_path)
    mutate(data)
    write_json(tmp_path, data)
    _tables, summary = _read(coco_params(tmp_path))
    kind = "images" if reason == "bad_image_record" else "annotations"
    assert summary["dropped"][kind] == {reason: 1}
    assert named in summary["examples"][reason][0]
    assert "annotations.json" in summary["examples"][reason][0]


@pytest.mark.parametrize("category, message", [
    ("car", "categories[2] is not an object"),
    ({"id": [3], "name": "x"}, "categories[2]: id [3] is not an integer"),
])
def test_malformed_category_fails_naming_it(tmp_path, category, message):
    data = make_coco(tmp_path)
    data["categories"].append(category)
    write_json(tmp_path, data)
    with pytest.raises(IngestionError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _read(coco_params(tmp_path))


def test_unhashable_ids_do_not_crash_the_structural_checks(tmp_path):
    data = make_coco(tmp_path)
    data["annotations"][0]["id"] = {"a": 1}
    data["images"][2]["id"] = [3]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 3]
    write_json(tmp_path, data)
    tables, summary = _read(coco_params(tmp_path))
    assert summary["dropped"] == {"images": {"bad_image_record": 1},
                                  "annotations": {"bad_annotation_record": 1}}
    assert set(tables.images["image_id"]) == {1, 2}


def test_annotation_of_an_image_record_without_integer_id_is_unknown(tmp_path):
    """The record is dropped; an annotation pointing at its id points at nothing."""
    data = make_coco(tmp_path)
    data["images"][2]["id"] = "3"
    write_json(tmp_path, data)
    with pytest.raises(IngestionError, match="annotation 300 refers to unknown image_id 3"):
        _read(coco_params(tmp_path))


# --- compressed strings: blocks, run limits --------------------------------------------

def _random_rle_strings(count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        height, width = (int(v) for v in rng.integers(1, 120, 2))
        bitmap = (rng.random((height, width)) > rng.random()).astype(np.uint8)
        yield height, width, mask_utils.encode(np.asfortranarray(bitmap))["counts"]


@pytest.mark.parametrize("block", [6, 7, 64, 1 << 18])
def test_block_decoding_equals_the_plain_loop(monkeypatch, block):
    monkeypatch.setattr(masks, "_BLOCK_CHARS", block)
    for height, width, counts in _random_rle_strings(60):
        expected = masks._summary_loop(counts)
        assert masks._summary_blocks(counts) == expected
        assert expected[1] == height * width
    for bad in (b"0" * 10 + b"o" * 7 + b"1", b"12" + b"\x01" + b"3" * 20, b"1" * 20 + b"o",
                b"0" * 8 + b"p" + b"0" * 8):
        with pytest.raises(masks.GeometryError) as loop:
            masks._summary_loop(bad)
        with pytest.raises(masks.GeometryError) as blocks:
            masks._summary_blocks(bad)
        assert loop.value.reason == blocks.value.reason == "rle_malformed"


def test_run_count_of_a_compressed_string_is_checked_while_decoding():
    height, width = 4, 4  # at most 17 runs, at most 102 characters
    many_zero_runs = "0" * 40  # 40 empty runs: short enough, too many
    problem = masks.segmentation_problem({"size": [height, width], "counts": many_zero_runs},
                                         height, width)
    assert problem[0] == "rle_too_many_runs"
