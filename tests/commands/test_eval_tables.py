"""The tables `instseg-eval` prints by default, on hand-made results."""
from __future__ import annotations

import argparse

from instseg_pipeline.commands.evaluate import (
    COCO_STATS,
    cityscapes_table,
    coco_table,
    format_table,
)
from instseg_pipeline.evaluation.coco import STAT_NAMES


def test_columns_line_up():
    text = format_table(["name", "value"], [["a", "0.5000"], ["longer", "n/a"]])
    header, rule, *rows = text.splitlines()
    assert header == "name     value"
    assert rule == "------  ------"
    assert rows == ["a       0.5000", "longer     n/a"]


def test_coco_table_covers_the_stats_in_order_and_marks_missing_areas():
    assert [row[0] for row in COCO_STATS] == list(STAT_NAMES)
    stats = {name: i / 100 for i, name in enumerate(STAT_NAMES)}
    stats["mAP_small"] = -1.0  # pycocotools: no ground truth in that area range
    text = coco_table(stats, argparse.Namespace(iou_type="bbox"))
    lines = text.splitlines()
    assert lines[0] == "COCO bbox (box IoU)"
    values = {line.split()[0]: line.split()[-1] for line in lines[3:]}
    assert values["mAP_small"] == "n/a"
    assert values["AR_large"] == "0.1100" and values["mAP_50"] == "0.0100"


def test_cityscapes_table_lists_classes_then_the_mean():
    result = {"AP": 0.25, "AP50": 0.5, "images": 3,
              "per_class": [{"category_id": 26, "name": "car", "AP": 0.25, "AP50": 0.5},
                            {"category_id": 24, "name": "person", "AP": None,
                             "AP50": None}]}
    lines = cityscapes_table(result, argparse.Namespace()).splitlines()
    assert lines[0] == "Cityscapes instance AP (3 images)"
    assert [line.split() for line in lines[3:]] == [["car", "0.2500", "0.5000"],
                                                    ["person", "n/a", "n/a"],
                                                    ["mean", "0.2500", "0.5000"]]
