"""Pixel accuracy and mean mask IoU (`evaluation.pixels`) on hand-made tables, checked against
values counted by hand."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from instseg_pipeline.data.masks import bitmap_to_rle, rle_to_string
from instseg_pipeline.evaluation.pixels import IGNORED, ground_truth_map, pixel_metrics


def _rle(height: int, width: int, rows: slice, cols: slice) -> str:
    mask = np.zeros((height, width), np.uint8)
    mask[rows, cols] = 1
    return rle_to_string(bitmap_to_rle(mask))


def _instance(image_id, category_id, height, width, rows, cols, iscrowd=False) -> dict:
    area = len(range(height)[rows]) * len(range(width)[cols])
    return {"image_id": image_id, "category_id": category_id, "iscrowd": iscrowd,
            "area": area, "rle": _rle(height, width, rows, cols)}


def _tables() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Image 1 (val, 4 x 6), image 2 (val, 2 x 2), image 3 (train, with no prediction).

    image 1: GT A cat 1 rows 0-1 cols 0-1, B cat 2 rows 2-3 cols 3-5, D cat 2 pixel (3, 0),
             crowd cat 1 row 0 cols 4-5; predictions P1 cat 1 (0.9) rows 0-1 cols 0-2,
             P2 cat 1 (0.8) rows 2-3 cols 2-5, P3 (0.3, below the threshold) everything.
    image 2: GT E cat 1 everywhere; P4 cat 1 (0.6) everywhere, P5 cat 2 (0.95) pixel (0, 0).
    """
    s = slice
    images = pd.DataFrame({"image_id": [1, 2, 3], "file_name": ["a", "b", "c"],
                           "height": [4, 2, 8], "width": [6, 2, 8],
                           "split": ["val", "val", "train"]})
    instances = pd.DataFrame([
        _instance(1, 1, 4, 6, s(0, 2), s(0, 2)), _instance(1, 2, 4, 6, s(2, 4), s(3, 6)),
        _instance(1, 2, 4, 6, s(3, 4), s(0, 1)),
        _instance(1, 1, 4, 6, s(0, 1), s(4, 6), iscrowd=True),
        _instance(2, 1, 2, 2, s(0, 2), s(0, 2)), _instance(3, 1, 8, 8, s(0, 8), s(0, 8))])
    instances.insert(0, "instance_id", range(1, len(instances) + 1))
    predictions = pd.DataFrame([
        {**_instance(1, 1, 4, 6, s(0, 2), s(0, 3)), "score": 0.9},
        {**_instance(1, 1, 4, 6, s(2, 4), s(2, 6)), "score": 0.8},
        {**_instance(1, 2, 4, 6, s(0, 4), s(0, 6)), "score": 0.3},
        {**_instance(2, 1, 2, 2, s(0, 2), s(0, 2)), "score": 0.6},
        {**_instance(2, 2, 2, 2, s(0, 1), s(0, 1)), "score": 0.95}])
    predictions.insert(0, "prediction_id", range(1, len(predictions) + 1))
    return images, instances, predictions


def test_hand_counted_values():
    result = pixel_metrics(*_tables(), split="val", score_threshold=0.5)
    # image 1: 24 pixels, 2 under the crowd region left out; wrong: (0-1, 2) predicted 1 on
    # background, (2-3, 2) likewise, (2-3, 3-5) class 1 on class 2, (3, 0) D missed -> 11
    # image 2: P5 (higher score) wins (0, 0) with the wrong class -> 1 wrong of 4
    assert result["pixel_accuracy"] == pytest.approx((22 - 11 + 4 - 1) / (22 + 4))
    # IoU: A-P1 4/6, B-P2 6/8, D unmatched 0, E-P4 1 (P5 overlaps E by 1/4 < 0.5)
    assert result["mean_mask_iou"] == pytest.approx((4 / 6 + 6 / 8 + 0 + 1) / 4)
    assert result["matched_mean_iou"] == pytest.approx((4 / 6 + 6 / 8 + 1) / 3)
    assert (result["images"], result["gt_instances"], result["matched"]) == (2, 4, 3)


def test_threshold_decides_which_predictions_count():
    # at 0.25 the 0.3 prediction (class 2 everywhere) is drawn under the better ones
    result = pixel_metrics(*_tables(), split="val", score_threshold=0.25)
    # image 1 wrong now: (0-1, 2) bg->1, (2-3, 2) bg->1, (2-3, 3-5) 2->1, and where P3
    # (class 2) shows: (0-1, 3), (1, 4-5), (2, 0-1), (3, 1) on background -> 2+2+6+7 = 17;
    # only (3, 0), D, is right by P3
    assert result["pixel_accuracy"] == pytest.approx((22 - 17 + 3) / 26)
    # P3 (IoU 3/24 with D) never reaches 0.5: the IoUs stay the same
    assert result["mean_mask_iou"] == pytest.approx((4 / 6 + 6 / 8 + 1) / 4)


def test_no_predictions_and_no_images():
    images, instances, predictions = _tables()
    empty = pixel_metrics(images, instances, predictions.iloc[:0], "val")
    # everything predicted background: right only on the GT background pixels
    assert empty["pixel_accuracy"] == pytest.approx((22 - 4 - 6 - 1 + 0) / 26)
    assert empty["mean_mask_iou"] == 0.0 and empty["matched_mean_iou"] is None
    nothing = pixel_metrics(images, instances, predictions, "test")
    assert nothing == {"pixel_accuracy": None, "mean_mask_iou": None,
                       "matched_mean_iou": None, "images": 0, "gt_instances": 0,
                       "matched": 0}


def test_small_ground_truth_stays_on_top_of_a_large_one_and_crowd_is_ignored():
    s = slice
    instances = pd.DataFrame([_instance(1, 2, 4, 4, s(1, 3), s(1, 3)),
                              _instance(1, 1, 4, 4, s(0, 4), s(0, 4)),
                              _instance(1, 3, 4, 4, s(0, 1), s(0, 1), iscrowd=True)])
    expected = np.array([[IGNORED, 1, 1, 1], [1, 2, 2, 1], [1, 2, 2, 1], [1, 1, 1, 1]])
    np.testing.assert_array_equal(ground_truth_map(instances, 4, 4), expected)


def test_evaluation_node_reports_and_logs_the_pixel_group(tmp_path, monkeypatch):
    import yaml
    from error_scene import build_scene

    from instseg_pipeline.pipelines.evaluation import nodes

    scene = build_scene(tmp_path)
    logged = {}
    monkeypatch.setattr(nodes.tracking, "log_metrics", logged.update)
    conf = Path(__file__).resolve().parents[2] / "conf/base/parameters_evaluation.yml"
    params = yaml.safe_load(conf.read_text())["evaluation"]
    tables = [scene[k] for k in ("images", "instances", "categories", "predictions")]
    metrics, _ = nodes.compute_coco_metrics(*tables, {**params, "backend": "pycocotools"})
    expected = pixel_metrics(scene["images"], scene["instances"], scene["predictions"], "val",
                             score_threshold=params["match_score_threshold"])
    assert metrics["pixel"] == expected
    # the scene: 5 non-crowd val GT (A-E), 4 matched (D is missed; E matched as a square)
    assert (expected["gt_instances"], expected["matched"]) == (5, 4)
    assert 0.5 < expected["pixel_accuracy"] < 1.0
    assert expected["mean_mask_iou"] == pytest.approx(scene["matches"]["iou"].sum() / 5)
    for name in ("pixel_accuracy", "mean_mask_iou", "matched_mean_iou"):
        assert logged[f"pixel/{name}"] == expected[name]
    assert "pixel/images" not in logged  # counts are not metrics
