"""Cityscapes source on small generated trees (16-bit instanceIds PNGs written by Pillow)."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from instseg_pipeline.data.config import SourceConfig
from instseg_pipeline.data.quality import IngestionError, QualityReport
from instseg_pipeline.data.sources import cityscapes
from instseg_pipeline.data.tables import check_tables


def typed(params: dict) -> SourceConfig:
    """The ``source`` block as the ingestion node builds it from the parameters."""
    return SourceConfig.from_params(params)


WIDTH, HEIGHT = 12, 8
# pixel value -> rectangles (row0, row1, col0, col1), half-open, never overlapping.
# 26001 and 26002 touch along a column; 24 and 26 are group regions; 7 (road) and
# 29001 (caravan) must be ignored.
LAYOUT = {
    26001: [(1, 4, 1, 5)],
    26002: [(1, 4, 5, 8)],
    24000: [(5, 7, 0, 3)],
    26: [(5, 8, 8, 12)],
    24: [(7, 8, 0, 4)],
    29001: [(5, 7, 4, 7)],
    33000: [(0, 1, 11, 12)],
}
KEPT = {24: True, 26: True, 24000: False, 26001: False, 26002: False, 33000: False}


def _bitmap(rects, height=HEIGHT, width=WIDTH) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    for r0, r1, c0, c1 in rects:
        mask[r0:r1, c0:c1] = 1
    return mask


def _id_map(layout=LAYOUT, height=HEIGHT, width=WIDTH) -> np.ndarray:
    ids = np.full((height, width), 7, dtype=np.uint16)
    for value, rects in layout.items():
        ids[_bitmap(rects, height, width).astype(bool)] = value
    return ids


def _write_rgb(path, width=WIDTH, height=HEIGHT, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _write_ids(path, ids: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(ids.astype(np.uint16))
    assert image.mode == "I;16"
    image.save(path)


def _add_frame(root, split, city, frame, ids=None, image_size=(WIDTH, HEIGHT),
               with_annotation=True):
    name = f"{city}_000000_{frame:06d}"
    image = root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png"
    _write_rgb(image, *image_size, seed=frame)
    if with_annotation:
        _write_ids(root / "gtFine" / split / city / f"{name}_gtFine_instanceIds.png",
                   _id_map() if ids is None else ids)
    return image


def _tree(root):
    _add_frame(root, "train", "aachen", 19)
    _add_frame(root, "train", "bochum", 3)
    _add_frame(root, "val", "frankfurt", 1)
    _add_frame(root, "test", "berlin", 5)
    return root


def _assert_rles_match(tables, expected: dict[int, np.ndarray]):
    """Each RLE decodes to the expected bitmap of its pixel value; area = pixel count."""
    sizes = tables.images.set_index("image_id")[["height", "width"]]
    for row in tables.instances.itertuples(index=False):
        height, width = sizes.loc[row.image_id]
        decoded = mask_utils.decode({"size": [int(height), int(width)],
                                     "counts": row.rle.encode()})
        want = expected[row.instance_id % 100_000]
        np.testing.assert_array_equal(decoded, want)
        assert row.area == int(want.sum())
        ys, xs = np.nonzero(want)
        assert row.bbox == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def test_reads_instances_groups_and_full_bit_depth(tmp_path, caplog):
    root = _tree(tmp_path)
    report = QualityReport("cityscapes")
    with caplog.at_level(logging.INFO, logger="instseg_pipeline.data.sources.cityscapes"):
        tables = cityscapes.read(typed({"root": str(root), "splits": ["train", "val", "test"],
                                        "verify_images": "decode"}), report)
    assert "skipping split 'test'" in caplog.text
    check_tables(tables.images, tables.instances, tables.categories)
    assert tables.images["file_name"].tolist() == [
        "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png",
        "leftImg8bit/train/bochum/bochum_000000_000003_leftImg8bit.png",
        "leftImg8bit/val/frankfurt/frankfurt_000000_000001_leftImg8bit.png"]
    assert tables.images["split"].tolist() == ["train", "train", "val"]
    assert set(tables.images["source"]) == {"cityscapes"}
    assert (tables.images[["width", "height"]].to_numpy() == [WIDTH, HEIGHT]).all()
    assert len(tables.instances) == 3 * len(KEPT)
    for row in tables.instances.itertuples(index=False):
        value = row.instance_id % 100_000
        assert row.iscrowd == KEPT[value]
        assert row.category_id == (value if value < 1000 else value // 1000)
    _assert_rles_match(tables, {v: _bitmap(LAYOUT[v]) for v in KEPT})
    assert report.notes["ignored_label_29"] == 3


def test_categories_are_the_eight_evaluated_classes(tmp_path):
    tables = cityscapes.read(typed({"root": str(_tree(tmp_path))}), QualityReport("cityscapes"))
    cats = tables.categories
    assert cats["category_id"].tolist() == [24, 25, 26, 27, 28, 31, 32, 33]
    assert cats["name"].tolist() == ["person", "rider", "car", "truck", "bus", "train",
                                     "motorcycle", "bicycle"]
    assert cats.set_index("name").loc["rider", "supercategory"] == "human"
    assert cats.set_index("name").loc["bus", "supercategory"] == "vehicle"
    assert cats["isthing"].all()
    assert set(tables.images["split"]) == {"train", "val"}  # default splits


def test_ids_are_deterministic_and_trace_to_pixel_values(tmp_path):
    params = {"root": str(_tree(tmp_path)), "verify_images": "header"}
    first = cityscapes.read(typed(params), QualityReport("cityscapes"))
    second = cityscapes.read(typed(params), QualityReport("cityscapes"))
    assert first.images.equals(second.images)
    assert first.instances.equals(second.instances)
    assert first.images["image_id"].tolist() == [1, 2, 3]
    car = first.instances[first.instances["instance_id"] == 2 * 100_000 + 26002]
    assert car["image_id"].tolist() == [2] and car["category_id"].tolist() == [26]


def _drop_case(root, case):
    """A tree whose train/bochum frame is broken in the way ``case`` names."""
    _add_frame(root, "train", "aachen", 19)
    if case == "missing_annotation":
        return _add_frame(root, "train", "bochum", 3, with_annotation=False)
    return _add_frame(root, "train", "bochum", 3, image_size=(WIDTH + 2, HEIGHT))


@pytest.mark.parametrize("case", ["missing_annotation", "size_mismatch"])
def test_broken_frame_is_skipped(tmp_path, case):
    _drop_case(tmp_path, case)
    report = QualityReport("cityscapes")
    tables = cityscapes.read(typed({"root": str(tmp_path), "splits": ["train"]}), report)
    assert tables.images["file_name"].str.contains("aachen").tolist() == [True]
    assert set(tables.instances["image_id"]) == {1}
    assert report.dropped["images"] == {case: 1}
    check_tables(tables.images, tables.instances, tables.categories)


@pytest.mark.parametrize("case", ["missing_annotation", "size_mismatch"])
def test_broken_frame_fails_when_asked(tmp_path, case):
    image = _drop_case(tmp_path, case)
    with pytest.raises(IngestionError, match=image.name):
        cityscapes.read(typed({"root": str(tmp_path), "splits": ["train"]}),
                        QualityReport("cityscapes", on_invalid="fail"))


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def test_undecodable_image_dropped_with_its_instances_only_when_decoding(tmp_path):
    root = tmp_path
    _add_frame(root, "val", "lindau", 1)
    bad = _add_frame(root, "val", "lindau", 2, image_size=(WIDTH, HEIGHT))
    _write_rgb(bad, 64, 64, seed=9)  # noisy pixels: truncation cuts the image data
    _write_ids(root / "gtFine/val/lindau/lindau_000000_000002_gtFine_instanceIds.png",
               _id_map(height=64, width=64))
    _truncate(bad)
    report = QualityReport("cityscapes")
    decoded = cityscapes.read(typed({"root": str(root), "splits": ["val"]}), report)
    assert decoded.images["image_id"].tolist() == [1]
    assert set(decoded.instances["image_id"]) == {1}
    assert report.dropped["images"] == {"corrupt": 1}
    probed = cityscapes.read(typed({"root": str(root), "splits": ["val"],
                                    "verify_images": "header"}), QualityReport("cityscapes"))
    assert probed.images["image_id"].tolist() == [1, 2]
    assert set(probed.instances["image_id"]) == {1, 2}


def _read_logged(root, caplog, **params):
    """(tables, report, log text) of one read at WARNING level and above."""
    report = QualityReport("cityscapes")
    with caplog.at_level(logging.WARNING, logger="instseg_pipeline.data.sources.cityscapes"):
        tables = cityscapes.read(typed({"root": str(root), **params}), report)
    return tables, report, caplog.text


def test_missing_split_folder_is_logged_and_the_others_read(tmp_path, caplog):
    _add_frame(tmp_path, "train", "aachen", 19)
    tables, report, log = _read_logged(tmp_path, caplog)
    assert "leftImg8bit/val not found" in log and "skipping split 'val'" in log
    assert tables.images["split"].tolist() == ["train"]
    assert report.notes["missing_split_val"] == 1 and "missing_split_train" not in report.notes


def test_only_val_present_reads_val_and_logs_train_missing(tmp_path, caplog):
    _add_frame(tmp_path, "val", "frankfurt", 1)
    _add_frame(tmp_path, "val", "lindau", 2)
    tables, report, log = _read_logged(tmp_path, caplog)  # default splits: train, val
    assert "leftImg8bit/train not found" in log and "skipping split 'train'" in log
    assert "leftImg8bit/val not found" not in log
    assert tables.images["split"].tolist() == ["val", "val"]
    assert tables.images["image_id"].tolist() == [1, 2]
    assert len(tables.instances) == 2 * len(KEPT)
    check_tables(tables.images, tables.instances, tables.categories)
    assert report.notes["missing_split_train"] == 1
    assert report.summary(tables.images, tables.instances)["notes"]["missing_split_train"] == 1


def test_all_splits_present_logs_nothing_missing(tmp_path, caplog):
    tables, report, log = _read_logged(_tree(tmp_path), caplog,
                                       splits=["train", "val", "test"])
    assert "not found" not in log
    assert tables.images["split"].tolist() == ["train", "train", "val"]
    assert not [key for key in report.notes if key.startswith("missing_split")]


@pytest.mark.parametrize("splits", [["train", "val"], ["val"], ["train", "val", "test"]])
def test_no_requested_split_present_fails_naming_root_and_splits(tmp_path, splits):
    _add_frame(tmp_path, "test", "berlin", 5)  # test only: has no instance labels
    labelled = [split for split in splits if split != "test"]
    with pytest.raises(IngestionError) as caught:
        cityscapes.read(typed({"root": str(tmp_path), "splits": splits}),
                        QualityReport("cityscapes"))
    message = str(caught.value)
    assert f"none of the requested splits {labelled} found under {tmp_path / 'leftImg8bit'}" \
        in message
    for split in labelled:
        assert str(tmp_path / "leftImg8bit" / split) in message


def test_only_the_unlabelled_test_split_requested_fails(tmp_path):
    _add_frame(tmp_path, "test", "berlin", 5)
    with pytest.raises(IngestionError, match="source.splits names no split with instance"):
        cityscapes.read(typed({"root": str(tmp_path), "splits": "test"}),
                        QualityReport("cityscapes"))


def test_missing_root_fails_naming_it(tmp_path):
    with pytest.raises(IngestionError, match=str(tmp_path / "absent" / "leftImg8bit")):
        cityscapes.read(typed({"root": str(tmp_path / "absent")}), QualityReport("cityscapes"))


def test_unknown_verify_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="verify_images"):
        cityscapes.read(typed({"root": str(_tree(tmp_path)), "verify_images": "maybe"}),
                        QualityReport("cityscapes"))
