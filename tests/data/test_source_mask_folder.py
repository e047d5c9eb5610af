"""Mask-folder source on small generated trees (palette, 8-bit and 16-bit mask PNGs)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from instseg_pipeline.data.config import SourceConfig
from instseg_pipeline.data.quality import IngestionError, QualityReport
from instseg_pipeline.data.sources import mask_folder
from instseg_pipeline.data.tables import check_tables


def typed(params: dict) -> SourceConfig:
    """The ``source`` block as the ingestion node builds it from the parameters."""
    return SourceConfig.from_params(params)


WIDTH, HEIGHT = 10, 6
# 1 and 2 touch along a column; the same id map is reused in every image
IDS = np.zeros((HEIGHT, WIDTH), dtype=np.uint16)
IDS[1:4, 1:4] = 1
IDS[1:4, 4:7] = 2
IDS[4:6, 8:10] = 3
PALETTE = [0, 0, 0, 220, 20, 60, 0, 0, 142, 250, 170, 30] + [255, 255, 255] * 252


def _write_rgb(path, width=WIDTH, height=HEIGHT, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _write_mask(path, ids=IDS, kind="P"):
    """Write ``ids`` as a palette ("P"), 8-bit ("L"), 16-bit ("I;16") or "RGB" PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "I;16":
        image = Image.fromarray(ids.astype(np.uint16))
    elif kind == "RGB":
        image = Image.fromarray(np.repeat(ids.astype(np.uint8)[..., None], 3, axis=2))
    else:
        image = Image.fromarray(ids.astype(np.uint8))
    if kind == "P":
        image = image.convert("P")
        image.putpalette(PALETTE)
    assert image.mode == kind
    image.save(path)


def _pair(root, stem, ids=IDS, kind="P", images="images", masks="masks", suffix="",
          ext=".png", image_size=None, sub=""):
    image = root / images / sub / f"{stem}{ext}"
    width, height = image_size or (ids.shape[1], ids.shape[0])
    _write_rgb(image, width, height, seed=len(stem))
    _write_mask(root / masks / sub / f"{stem}{suffix}.png", ids, kind)
    return image


def _decode(tables, row) -> np.ndarray:
    image = tables.images.set_index("image_id").loc[row.image_id]
    return mask_utils.decode({"size": [int(image.height), int(image.width)],
                              "counts": row.rle.encode()})


def _assert_rles_match(tables, ids: np.ndarray):
    """Each instance decodes to exactly the pixels of its id; area and box agree."""
    for row in tables.instances.itertuples(index=False):
        want = (ids == row.instance_id % 100_000).astype(np.uint8)
        np.testing.assert_array_equal(_decode(tables, row), want)
        assert row.area == int(want.sum())
        ys, xs = np.nonzero(want)
        assert row.bbox == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    check_tables(tables.images, tables.instances, tables.categories)


def test_palette_masks_keep_touching_instances_apart(tmp_path):
    _pair(tmp_path, "a")
    _pair(tmp_path, "b", kind="L", ext=".jpg")
    _pair(tmp_path, "c", ids=np.zeros_like(IDS))
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    report = QualityReport("mask_folder")
    tables = mask_folder.read(typed({"root": str(tmp_path)}), report)
    assert tables.images["file_name"].tolist() == ["images/a.png", "images/b.jpg",
                                                   "images/c.png"]
    assert tables.images["split"].tolist() == ["", "", ""]
    assert set(tables.images["source"]) == {"mask_folder"}
    assert tables.instances["instance_id"].tolist() == [100_001, 100_002, 100_003,
                                                        200_001, 200_002, 200_003]
    assert not tables.instances["iscrowd"].any()
    assert tables.categories[["category_id", "name"]].values.tolist() == [[1, "object"]]
    _assert_rles_match(tables, IDS)
    assert sum(report.dropped["images"].values()) == 0


def test_penn_fudan_naming(tmp_path):
    _pair(tmp_path, "FudanPed00001", images="PNGImages", masks="PedMasks", suffix="_mask")
    _pair(tmp_path, "PennPed00002", images="PNGImages", masks="PedMasks", suffix="_mask",
          ext=".PNG", kind="L")
    params = {"root": str(tmp_path), "images": "PNGImages", "masks": "PedMasks",
              "mask_suffix": "_mask", "image_glob": ["*.png"], "class_name": "person"}
    tables = mask_folder.read(typed(params), QualityReport("mask_folder"))
    assert tables.images["file_name"].tolist() == ["PNGImages/FudanPed00001.png",
                                                   "PNGImages/PennPed00002.PNG"]
    assert tables.categories["name"].tolist() == ["person"]
    assert len(tables.instances) == 6
    _assert_rles_match(tables, IDS)


def test_sixteen_bit_ids_above_255(tmp_path):
    ids = IDS.astype(np.int64) * 300  # 300, 600, 900: lost in any 8-bit conversion
    ids[0, 0] = 65535
    _pair(tmp_path, "deep", ids=ids, kind="I;16")
    tables = mask_folder.read(typed({"root": str(tmp_path)}), QualityReport("mask_folder"))
    assert tables.instances["instance_id"].tolist() == [100_300, 100_600, 100_900, 165_535]
    _assert_rles_match(tables, ids)


@pytest.mark.parametrize("how", ["param", "json", "yaml"])
def test_class_map_names_ids_and_ignores_void(tmp_path, how):
    ids = IDS.copy()
    ids[0, :] = 255
    _pair(tmp_path, "a", ids=ids, kind="L")
    mapping = {1: "person", 2: "bicycle", 3: "person", 255: None}
    params = {"root": str(tmp_path), "class_name": None}
    if how == "param":
        params["class_map"] = mapping
    elif how == "json":
        (tmp_path / "classes.json").write_text(json.dumps(mapping))
        params["class_map_file"] = "classes.json"
    else:
        (tmp_path / "classes.yml").write_text("1: person\n2: bicycle\n3: person\n255: null\n")
        params["class_map_file"] = "classes.yml"
    report = QualityReport("mask_folder")
    tables = mask_folder.read(typed(params), report)
    assert tables.categories["name"].tolist() == ["bicycle", "person"]
    assert tables.categories["category_id"].tolist() == [1, 2]
    assert tables.instances["category_id"].tolist() == [2, 1, 2]
    assert report.notes["unmapped_id"] == 1
    _assert_rles_match(tables, ids)


def test_unmapped_ids_fall_back_to_class_name(tmp_path):
    _pair(tmp_path, "a")
    tables = mask_folder.read(typed({"root": str(tmp_path), "class_map": {2: "bicycle"}}),
                              QualityReport("mask_folder"))
    assert tables.categories["name"].tolist() == ["bicycle", "object"]
    assert tables.instances["category_id"].tolist() == [2, 1, 2]


def test_split_subfolders_and_split_param(tmp_path):
    _pair(tmp_path, "t1", sub="train")
    _pair(tmp_path, "v1", sub="val")
    _pair(tmp_path, "flat")
    tables = mask_folder.read(typed({"root": str(tmp_path), "split": "train"}),
                              QualityReport("mask_folder"))
    by_name = dict(zip(tables.images["file_name"], tables.images["split"]))
    assert by_name == {"images/flat.png": "train", "images/train/t1.png": "train",
                       "images/val/v1.png": "val"}
    _assert_rles_match(tables, IDS)


def _broken(root, case):
    _pair(root, "good")
    if case == "missing_mask":
        _write_rgb(root / "images" / "bad.png")
    elif case == "size_mismatch":
        _pair(root, "bad", image_size=(WIDTH + 1, HEIGHT))
    elif case == "unsupported_mask_mode":
        _pair(root, "bad", kind="RGB")
    return root / "images" / "bad.png"


CASES = ["missing_mask", "size_mismatch", "unsupported_mask_mode"]


@pytest.mark.parametrize("case", CASES)
def test_broken_pair_is_skipped(tmp_path, case):
    _broken(tmp_path, case)
    report = QualityReport("mask_folder")
    tables = mask_folder.read(typed({"root": str(tmp_path)}), report)
    assert tables.images["file_name"].tolist() == ["images/good.png"]
    assert set(tables.instances["image_id"]) == set(tables.images["image_id"])
    assert report.dropped["images"] == {case: 1}
    _assert_rles_match(tables, IDS)


@pytest.mark.parametrize("case", CASES)
def test_broken_pair_fails_when_asked(tmp_path, case):
    _broken(tmp_path, case)
    with pytest.raises(IngestionError, match="bad"):
        mask_folder.read(typed({"root": str(tmp_path)}),
                         QualityReport("mask_folder", on_invalid="fail"))


def test_undecodable_image_dropped_only_when_decoding(tmp_path):
    _pair(tmp_path, "good")
    ids = np.zeros((64, 64), dtype=np.uint8)
    ids[10:20, 10:20] = 1
    bad = _pair(tmp_path, "bad", ids=ids)
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) * 2 // 3])
    report = QualityReport("mask_folder")
    decoded = mask_folder.read(typed({"root": str(tmp_path)}), report)
    assert decoded.images["file_name"].tolist() == ["images/good.png"]
    assert set(decoded.instances["image_id"]) == set(decoded.images["image_id"])
    assert report.dropped["images"] == {"corrupt": 1}
    probed = mask_folder.read(typed({"root": str(tmp_path), "verify_images": "header"}),
                              QualityReport("mask_folder"))
    assert probed.images["file_name"].tolist() == ["images/bad.png", "images/good.png"]


def test_two_images_sharing_one_mask_are_refused(tmp_path):
    _pair(tmp_path, "a")
    _write_rgb(tmp_path / "images" / "a.jpg")
    report = QualityReport("mask_folder")
    tables = mask_folder.read(typed({"root": str(tmp_path)}), report)
    assert tables.images["file_name"].tolist() == ["images/a.jpg"]
    assert report.dropped["images"] == {"ambiguous_mask": 1}


def test_missing_folder_fails(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(IngestionError, match="masks"):
        mask_folder.read(typed({"root": str(tmp_path)}), QualityReport("mask_folder"))


def test_thirty_two_bit_tiff_masks_and_ids_out_of_range(tmp_path):
    wide = np.where(IDS > 0, IDS.astype(np.int32) + 69_999, 0)  # ids 70000..70002: 17 bit
    too_big = IDS.astype(np.int32) * 123_456
    for stem, ids in (("wide", wide), ("too_big", too_big)):
        _write_rgb(tmp_path / "images" / f"{stem}.png")
        (tmp_path / "masks").mkdir(exist_ok=True)
        Image.fromarray(ids).save(tmp_path / "masks" / f"{stem}.tif")
    report = QualityReport("mask_folder")
    tables = mask_folder.read(typed({"root": str(tmp_path), "mask_ext": ".tif"}), report)
    assert tables.images["file_name"].tolist() == ["images/wide.png"]
    assert report.dropped["images"] == {"mask_id_out_of_range": 1}
    _assert_rles_match(tables, wide)
