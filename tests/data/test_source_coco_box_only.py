"""COCO detection data (boxes without masks), alone or mixed with drawn masks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from coco_fixtures import coco_params, decode, square_polygon, write_json
from PIL import Image
from scene_shapes import circle

from instseg_pipeline.data.config import SourceConfig
from instseg_pipeline.data.quality import IngestionError, QualityReport
from instseg_pipeline.data.sources import coco
from instseg_pipeline.data.tables import (
    TableContractError,
    check_tables,
    make_instances,
    with_mask_source,
)

H, W = 90, 120
# per image: discs (cx, cy, r) on a plain background
DISCS = {1: [(35, 45, 25), (90, 40, 18)], 2: [(60, 45, 30)]}


def _box(cx: int, cy: int, r: int) -> list[float]:
    return [float(cx - r), float(cy - r), float(2 * r + 1), float(2 * r + 1)]


def write_scene(root: Path) -> dict:
    """Images with red discs on blue; image 1: one drawn mask (a square polygon on disc
    1), the discs as box-only annotations (no segmentation key, and an empty list), a
    crowd box-only region; image 2: one box-only disc."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id, discs in DISCS.items():
        pixels = np.empty((H, W, 3), np.uint8)
        pixels[:] = (40, 120, 200)
        for cx, cy, r in discs:
            pixels[circle(H, W, cx, cy, r).astype(bool)] = (220, 60, 40)
        Image.fromarray(pixels).save(root / "images" / f"scene{image_id}.png")
        images.append({"id": image_id, "file_name": f"scene{image_id}.png", "width": W,
                       "height": H})
        for index, disc in enumerate(discs):
            annotations.append({"id": 10 * image_id + index, "image_id": image_id,
                                "category_id": 1, "bbox": _box(*disc), "iscrowd": 0})
    annotations[1]["segmentation"] = []
    annotations.append({"id": 5, "image_id": 1, "category_id": 1, "iscrowd": 0,
                        "segmentation": square_polygon(2, 2, 10), "bbox": [2, 2, 10, 10]})
    annotations.append({"id": 6, "image_id": 1, "category_id": 1, "iscrowd": 1,
                        "segmentation": None, "bbox": [110, 80, 15, 15]})
    data = {"images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "disc", "supercategory": "shape"}]}
    write_json(root, data)
    return data


def _read(root: Path, on_invalid: str = "skip", **extra):
    report = QualityReport("coco", on_invalid)
    tables = coco.read(SourceConfig.from_params(coco_params(root, **extra)), report)
    return tables, report.summary(tables.images, tables.instances)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return float((a & b).sum() / (a | b).sum())


def test_box_only_and_drawn_masks_are_read_together(tmp_path):
    write_scene(tmp_path)
    tables, summary = _read(tmp_path, pseudo_masks={"method": "grabcut", "workers": 0})
    check_tables(tables.images, tables.instances, tables.categories)
    rows = tables.instances.set_index("instance_id")
    assert rows["mask_source"].to_dict() == {10: "grabcut", 11: "grabcut", 20: "grabcut",
                                             5: "annotated", 6: "box"}
    for instance_id, (image_id, index) in {10: (1, 0), 11: (1, 1), 20: (2, 0)}.items():
        mask = decode(rows.at[instance_id, "rle"], H, W)
        assert _iou(mask, circle(H, W, *DISCS[image_id][index])) > 0.9
        assert rows.at[instance_id, "area"] == mask.sum()
    assert decode(rows.at[5, "rle"], H, W).sum() == 100           # the drawn square
    crowd = decode(rows.at[6, "rle"], H, W)                          # crowd: its filled box,
    assert crowd.sum() == 10 * 10 and rows.at[6, "bbox"] == [110, 80, 10, 10]  # clipped
    assert summary["notes"] == {"pseudo_masks_grabcut": 3}
    assert summary["dropped_total"] == {"images": 0, "annotations": 0}


def test_the_box_method_fills_boxes_and_workers_change_nothing(tmp_path):
    write_scene(tmp_path)
    boxes, _ = _read(tmp_path, pseudo_masks={"method": "box", "workers": 0})
    rows = boxes.instances.set_index("instance_id")
    assert rows.at[20, "mask_source"] == "box" and rows.at[20, "area"] == 61 * 61
    alone, _ = _read(tmp_path, pseudo_masks={"method": "grabcut", "workers": 0})
    pooled, _ = _read(tmp_path, pseudo_masks={"method": "grabcut", "workers": 2})
    assert alone.instances.equals(pooled.instances)


def test_box_only_annotations_without_a_method_fail_naming_file_ids_and_the_fix(tmp_path):
    write_scene(tmp_path)
    for on_invalid in ("skip", "fail"):
        with pytest.raises(IngestionError) as info:
            _read(tmp_path, on_invalid)
        message = str(info.value)
        assert str(tmp_path / "annotations.json") in message
        assert "annotation 10 (image 1)" in message and "4 such box-only" in message
        assert "source.pseudo_masks.method: box | grabcut | sam" in message


@pytest.mark.parametrize(("reason", "bbox"), [
    ("box_outside_image", [W + 5.0, 10.0, 20.0, 20.0]),
    ("box_outside_image", [-30.0, -30.0, 30.0, 10.0]),     # ends at the image's edge
    ("zero_area_box", [10.0, 10.0, 0.0, 20.0]),
    ("zero_area_box", [10.0, 10.0, 20.0, -1.0]),
])
def test_unusable_boxes_are_skipped_and_counted_or_fatal(tmp_path, reason, bbox):
    data = write_scene(tmp_path)
    data["annotations"][2]["bbox"] = bbox   # annotation 20 of image 2
    write_json(tmp_path, data)
    tables, summary = _read(tmp_path, pseudo_masks={"method": "box", "workers": 0})
    assert summary["dropped"]["annotations"] == {reason: 1}
    assert 20 not in set(tables.instances["instance_id"])
    (message,) = summary["examples"][reason]
    assert "annotation 20" in message and "image 2" in message
    with pytest.raises(IngestionError, match=r"annotation 20 \(image 2, scene2.png\)"):
        _read(tmp_path, "fail", pseudo_masks={"method": "box", "workers": 0})


def test_tables_know_every_mask_source_and_refuse_others(tmp_path):
    write_scene(tmp_path)
    tables, _ = _read(tmp_path, pseudo_masks={"method": "box", "workers": 0})
    old = tables.instances.drop(columns="mask_source")   # a table written before the column
    assert with_mask_source(old)["mask_source"].tolist() == ["annotated"] * len(old)
    assert make_instances(old.to_dict("records"))["mask_source"].eq("annotated").all()
    bad = tables.instances.copy()
    bad.loc[bad["instance_id"] == 20, "mask_source"] = "guessed"
    with pytest.raises(TableContractError, match=r"instances \[20\] have mask_source "
                                                 r"\['guessed'\], not one of annotated, "
                                                 r"grabcut, box, sam"):
        check_tables(tables.images, bad, tables.categories)
