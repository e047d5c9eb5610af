"""Stuff in panoptic inference and ground truth: `predict.panoptic.combine_panoptic`,
`predict.panoptic.panoptic_outputs` and `evaluation.panoptic.panoptic_gt_from_tables` /
`pq_from_predictions` on hand-made 8 x 10 maps."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from instseg_pipeline.data.masks import bitmap_to_rle, rle_area, rle_bbox, rle_to_string
from instseg_pipeline.data.tables import make_categories, make_images, make_instances
from instseg_pipeline.evaluation import MetricInputError
from instseg_pipeline.evaluation.panoptic import panoptic_gt_from_tables, pq_from_predictions
from instseg_pipeline.predict.panoptic import combine_panoptic, panoptic_outputs, png_names

H, W = 8, 10
STUFF = {1: 5, 2: 6}  # semantic label -> stuff category id


def _box(y0, y1, x0, x1) -> np.ndarray:
    mask = np.zeros((H, W), np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def _semantic() -> np.ndarray:
    semantic = np.zeros((H, W), np.int64)
    semantic[:3] = 1          # sky: rows 0-2
    semantic[6:] = 2          # ground: rows 6-7
    return semantic


def test_things_paint_first_then_each_stuff_label_claims_its_free_pixels():
    thing = _box(1, 5, 2, 5)  # reaches into the sky rows
    ids, segments = combine_panoptic(thing[None], np.array([0.9]), np.array([1]), _semantic(),
                                     STUFF, stuff_min_area=1)
    assert [(s["id"], s["category_id"]) for s in segments] == [(1, 1), (2, 5), (3, 6)]
    assert (ids[thing.astype(bool)] == 1).all()
    sky = segments[1]
    assert sky["area"] == 3 * W - 2 * 3 and "score" not in sky  # less the thing's pixels
    assert sky["bbox"] == [0, 0, W, 3]
    # label 0 (thing pixels) no instance claimed stays void
    assert (ids[3:6][~thing[3:6].astype(bool)] == 0).all()


def test_stuff_min_area_counts_free_pixels_and_low_scores_leave_things_out():
    thing = _box(5, 8, 0, W)  # covers most of the ground: 2 x 10 of it
    ids, segments = combine_panoptic(thing[None], np.array([0.9]), np.array([1]), _semantic(),
                                     STUFF, stuff_min_area=5)
    assert [s["category_id"] for s in segments] == [1, 5]  # no free ground left
    ids, segments = combine_panoptic(thing[None], np.array([0.3]), np.array([1]), _semantic(),
                                     STUFF, stuff_min_area=21)
    assert [s["category_id"] for s in segments] == [5]  # thing below 0.5; ground 20 < 21
    assert (ids[6:] == 0).all()


def test_a_semantic_label_without_a_stuff_category_is_an_error():
    with pytest.raises(ValueError, match=r"semantic label 2 has no stuff category"):
        combine_panoptic(np.zeros((0, H, W), np.uint8), np.zeros(0), np.zeros(0, int),
                         _semantic(), {1: 5}, stuff_min_area=1)
    with pytest.raises(ValueError, match="differ in size"):
        combine_panoptic(np.zeros((0, H, W), np.uint8), np.zeros(0), np.zeros(0, int),
                         _semantic()[:4], STUFF)


def _rows(masks: list[tuple[int, int, np.ndarray, bool]], start: int) -> pd.DataFrame:
    rows = []
    for k, (image_id, category, mask, crowd) in enumerate(masks, start=start):
        rle = bitmap_to_rle(mask)
        rows.append({"instance_id": k, "image_id": image_id, "category_id": category,
                     "bbox": rle_bbox(rle), "area": rle_area(rle), "iscrowd": crowd,
                     "rle": rle_to_string(rle)})
    return make_instances(rows)


def _tables():
    images = make_images([{"image_id": 1, "file_name": "a/x.jpg", "width": W, "height": H,
                           "split": "val", "source": "t"},
                          {"image_id": 2, "file_name": "b/x.jpg", "width": W, "height": H,
                           "split": "val", "source": "t"}])
    thing = _box(1, 5, 2, 5)
    instances = _rows([(1, 1, thing, False), (2, 1, _box(0, 2, 0, 2), True)], start=1)
    sky = (_semantic() == 1).astype(np.uint8)  # under the thing too: GT stuff loses it
    stuff = _rows([(1, 5, sky, False), (1, 6, (_semantic() == 2).astype(np.uint8), False),
                   (2, 5, sky, False)], start=10)
    categories = make_categories([{"category_id": c, "name": n, "supercategory": "s",
                                   "isthing": t} for c, n, t in ((1, "box", True),
                                                                 (5, "sky", False),
                                                                 (6, "ground", False))])
    return images, instances, stuff, categories


def test_gt_stuff_fills_only_pixels_no_thing_covers_crowd_included():
    images, instances, stuff, _ = _tables()
    ids, segments = panoptic_gt_from_tables(images.iloc[1], instances[instances.image_id == 2],
                                            stuff[stuff.image_id == 2])
    crowd, sky = segments
    assert crowd["iscrowd"] == 1 and (crowd["id"], sky["id"]) == (1, 2)
    assert sky["area"] == 3 * W - 4 and sky["instance_id"] == 12
    assert (ids[:2, :2] == 1).all() and (ids[2] == 2).all()


def test_pq_from_predictions_scores_stuff_only_when_predicted():
    images, instances, stuff, categories = _tables()
    predictions = _rows([(1, 1, _box(1, 5, 2, 5), False)], start=1).assign(score=0.9)
    crowd_image = _semantic()
    crowd_image[:2, :2] = 0  # a thing pixel (the crowd box) that no instance claims: void
    semantic = {1: _semantic(), 2: crowd_image}
    full = panoptic_outputs(images, predictions, categories, iter(semantic.items()), STUFF,
                            stuff_min_area=1)
    result = pq_from_predictions(images, instances, stuff, categories, full)
    assert result["all"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 3}
    # sky predicted over the crowd box too: those pixels count in its union
    semantic[2] = _semantic()
    over_crowd = panoptic_outputs(images, predictions, categories, iter(semantic.items()),
                                  STUFF, stuff_min_area=1)
    sky = pq_from_predictions(images, instances, stuff, categories,
                              over_crowd)["per_category"][5]
    assert sky["tp"] == 2 and sky["pq"] == pytest.approx((1 + 26 / 30) / 2)
    things = panoptic_outputs(images, predictions, categories)
    result = pq_from_predictions(images, instances, stuff, categories, things)
    assert result["stuff"]["n"] == 0 and result["things"]["pq"] == 1.0
    # the same name in two folders gets the image id
    assert png_names(images) == {1: "x.png", 2: "x_2.png"}
    assert sorted(full["pngs"]) == ["x.png", "x_2.png"]


def test_pq_from_predictions_names_what_is_missing():
    images, instances, stuff, categories = _tables()
    empty = _rows([], start=1).assign(score=0.0)
    predictions = panoptic_outputs(images, empty, categories)
    one_image = {**predictions, "annotations": predictions["annotations"][:1]}
    with pytest.raises(MetricInputError, match=r"no annotation for images \[2\]"):
        pq_from_predictions(images, instances, stuff, categories, one_image)
    no_png = {**predictions, "pngs": {}}
    with pytest.raises(MetricInputError, match="image 1 names PNG x.png"):
        pq_from_predictions(images, instances, stuff, categories, no_png)
    with pytest.raises(ValueError, match=r"no semantic map for images \[2\]"):
        panoptic_outputs(images, empty, categories, iter([(1, _semantic())]), STUFF)
    with pytest.raises(ValueError, match=r"name categories \[7\]"):
        panoptic_outputs(images, empty, categories, iter([]), {1: 7})
