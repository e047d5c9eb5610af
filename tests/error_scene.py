"""Evaluation figures on a tiny on-disk dataset with known true / false positives.

Scene (160 x 120 PNGs, categories circle=1, square=2, triangle=5):
- image 1 (val): circle A and square B, both found; a confident background FP (p3) and a
  low-score FP (p4, below the threshold);
- image 2 (val): square C found, triangle D missed, a crowd region with a prediction on it
  (p8: ignored, as COCO ignores it);
- image 3 (val): circle E found but called a square (p6: a classification confusion);
- image 4 (train): square F with no prediction (not evaluated, so no false negative).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from PIL import Image

from instseg_pipeline.data import masks
from instseg_pipeline.data.tables import make_categories, make_images, make_instances
from instseg_pipeline.evaluation import metrics as evaluation
from instseg_pipeline.viz.overlays import evaluation as ve

HEIGHT, WIDTH = 120, 160
THRESHOLD = 0.5
PREDICTION_COLUMNS = ["prediction_id", "image_id", "category_id", "label", "score", "bbox",
                      "area", "rle", "height", "width"]


def _circle(cx, cy, r):
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    cv2.circle(mask, (cx, cy), r, 1, thickness=-1)
    return mask


def _rect(x0, y0, x1, y1):
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def _triangle(points):
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    cv2.fillPoly(mask, [np.asarray(points, np.int32)], 1)
    return mask


def _shift(mask, dx, dy):
    return np.roll(np.roll(mask, dy, axis=0), dx, axis=1)


# GT: instance_id -> (image_id, category_id, mask, iscrowd)
GT = {
    11: (1, 1, _circle(45, 50, 24), False),        # A
    12: (1, 2, _rect(100, 55, 140, 95), False),    # B
    21: (2, 2, _rect(20, 20, 50, 50), False),      # C
    22: (2, 5, _triangle([(90, 90), (140, 90), (115, 45)]), False),  # D (missed)
    23: (2, 1, _rect(20, 80, 60, 115), True),      # crowd
    31: (3, 1, _circle(80, 60, 14), False),        # E
    41: (4, 2, _rect(30, 30, 70, 70), False),      # F (train)
}
# predictions: prediction_id -> (image_id, category_id, score, mask)
PRED = {
    1: (1, 1, 0.95, _shift(GT[11][2], 2, 1)),
    2: (1, 2, 0.90, _shift(GT[12][2], -1, 2)),
    3: (1, 2, 0.80, _rect(5, 95, 30, 118)),        # background FP
    4: (1, 5, 0.30, _rect(120, 5, 150, 30)),       # below the threshold
    5: (2, 2, 0.85, _shift(GT[21][2], 1, 1)),
    6: (3, 2, 0.70, _shift(GT[31][2], 1, 0)),      # right place, wrong class
    8: (2, 1, 0.75, _rect(25, 85, 55, 110)),       # inside the crowd region
}
NAMES = {1: "circle", 2: "square", 5: "triangle"}
COLOURS = {1: (200, 40, 40), 2: (40, 80, 200), 5: (230, 200, 30)}


def _write_image(path: Path, image_id: int) -> None:
    rng = np.random.default_rng(image_id)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    base = np.stack([xx / WIDTH * 120 + 60, yy / HEIGHT * 100 + 80, 150 + 0 * xx], axis=2)
    pixels = base + rng.normal(0, 12, base.shape)
    for gt_image, category, mask, _ in GT.values():
        if gt_image == image_id:
            pixels[mask.astype(bool)] = COLOURS[category]
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path)


def _instance_row(instance_id, image_id, category_id, mask, crowd):
    rle = masks.bitmap_to_rle(mask)
    return {"instance_id": instance_id, "image_id": image_id, "category_id": category_id,
            "bbox": masks.rle_bbox(rle), "area": masks.rle_area(rle), "iscrowd": crowd,
            "rle": masks.rle_to_string(rle)}


def _prediction_row(prediction_id, image_id, category_id, score, mask):
    rle = masks.bitmap_to_rle(mask)
    return {"prediction_id": prediction_id, "image_id": image_id, "category_id": category_id,
            "label": category_id, "score": score, "bbox": masks.rle_bbox(rle),
            "area": masks.rle_area(rle), "rle": masks.rle_to_string(rle),
            "height": HEIGHT, "width": WIDTH}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("viz_dataset")
    (root / "images").mkdir()
    for image_id in range(1, 5):
        _write_image(root / "images" / f"img{image_id}.png", image_id)
    images = make_images({"image_id": i, "file_name": f"images/img{i}.png", "width": WIDTH,
                          "height": HEIGHT, "split": "train" if i == 4 else "val",
                          "source": "test"} for i in range(1, 5))
    instances = make_instances(_instance_row(k, *v) for k, v in GT.items())
    categories = make_categories({"category_id": c, "name": n, "supercategory": "shape",
                                  "isthing": True} for c, n in NAMES.items())
    predictions = pd.DataFrame([_prediction_row(k, *v) for k, v in PRED.items()],
                               columns=PREDICTION_COLUMNS)
    return _evaluated(root, images, instances, categories, predictions)


def _evaluated(root, images, instances, categories, predictions) -> dict:
    result = evaluation.coco_metrics(images, instances, categories, predictions, "val",
                                     backend="pycocotools")
    matches = evaluation.matched_mask_ious(images, instances, predictions, "val",
                                           score_threshold=THRESHOLD)
    return {"root": root, "images": images, "instances": instances, "categories": categories,
            "predictions": predictions, "metrics": result["metrics"],
            "arrays": result["arrays"], "matches": matches}


@pytest.fixture(scope="module")
def empty(data):
    """The same dataset with no predictions at all."""
    predictions = data["predictions"].iloc[0:0]
    return _evaluated(data["root"], data["images"], data["instances"], data["categories"],
                      predictions)


def _history():
    iterations = np.arange(60)
    history = pd.DataFrame({"iteration": iterations, "epoch": iterations // 20,
                            "loss": 2.0 * np.exp(-iterations / 30) + 0.1,
                            "loss_mask": np.exp(-iterations / 30), "lr": 0.01})
    val = pd.DataFrame({"epoch": [0, 1, 2], "iteration": [20, 40, 60],
                        "loss": [1.3, 0.9, 0.7]})
    return history, val


def _dashboard(d, history=None, val_history=None):
    return ve.performance_dashboard(d["metrics"], d["arrays"], d["matches"], history,
                                    val_history, d["categories"], d["predictions"],
                                    d["images"], d["instances"], d["root"])


def _titles(figure: Figure) -> list[str]:
    return [ax.get_title() for ax in figure.axes]


def _saved_size(figure: Figure, path: Path) -> int:
    figure.savefig(path, dpi=40)
    return path.stat().st_size


def _axis_with_title(figure: Figure, text: str):
    found = [ax for ax in figure.axes if text in ax.get_title()]
    assert len(found) == 1, (text, _titles(figure))
    return found[0]


# ------------------------------------------------------------------ pure helpers

def test_matching_behind_the_scene_is_as_designed(data):
    pairs = set(zip(data["matches"]["prediction_id"], data["matches"]["instance_id"]))
    assert pairs == {(1, 11), (2, 12), (5, 21), (6, 31)}


def test_false_positives_are_the_unmatched_confident_predictions(data):
    found = ve.false_positives(data["predictions"], data["matches"], THRESHOLD)
    assert found["prediction_id"].tolist() == [3, 8]  # highest score first
    outside_crowd = ve.false_positives(data["predictions"], data["matches"], THRESHOLD,
                                       instances=data["instances"])
    assert outside_crowd["prediction_id"].tolist() == [3]
    everything = ve.false_positives(data["predictions"], data["matches"], 0.0,
                                    instances=data["instances"])
    assert everything["prediction_id"].tolist() == [3, 4]


def test_in_crowd_flags_only_the_prediction_on_the_crowd_region(data):
    flags = ve.in_crowd(data["predictions"], data["instances"])
    assert data["predictions"]["prediction_id"][flags].tolist() == [8]


def test_false_negatives_are_unmatched_non_crowd_gt_of_the_split(data):
    val = ve.split_images(data["images"], "val")
    found = ve.false_negatives(data["instances"], data["matches"], val)
    assert found["instance_id"].tolist() == [22]
    everywhere = ve.false_negatives(data["instances"], data["matches"], data["images"])
    assert sorted(everywhere["instance_id"]) == [22, 41]


def test_image_scores_count_found_missed_and_confused(data):
    val = ve.split_images(data["images"], "val")
    scores = ve.image_scores(val, data["instances"], data["predictions"], data["matches"],
                             THRESHOLD).set_index("image_id")
    assert scores.loc[[1, 2, 3], "ground_truth"].tolist() == [2, 2, 1]
    assert scores.loc[[1, 2, 3], "predicted"].tolist() == [3, 1, 1]  # p4 low, p8 in crowd
    assert scores.loc[[1, 2, 3], "correct"].tolist() == [2, 1, 0]
    assert scores["f1"].round(6).tolist() == [0.8, round(2 / 3, 6), 0.0]
    assert scores.loc[2, "recall"] == 0.5 and scores.loc[1, "precision"] == pytest.approx(2 / 3)
    assert scores.loc[1, "mean_iou"] == pytest.approx(
        data["matches"].set_index("image_id").loc[1, "iou"].mean())


def test_confusion_counts_place_matches_false_positives_and_misses(data):
    val = ve.split_images(data["images"], "val")
    fp = ve.false_positives(data["predictions"], data["matches"], THRESHOLD, data["instances"])
    fn = ve.false_negatives(data["instances"], data["matches"], val)
    counts = ve.confusion_counts(data["categories"], data["matches"], fp, fn)
    assert counts.index.tolist() == ["circle", "square", "triangle", "background"]
    assert counts.columns.tolist() == ["circle", "square", "triangle", "missed"]
    expected = np.zeros((4, 4), dtype=np.int64)
    expected[0, 0] = expected[0, 1] = 1   # circle found; circle called square
    expected[1, 1] = 2                    # two squares found
    expected[2, 3] = 1                    # triangle missed
    expected[3, 1] = 1                    # background called square
    np.testing.assert_array_equal(counts.to_numpy(), expected)


# ------------------------------------------------------------------ figures

def test_visualisation_suite_has_four_panels_per_image(data, tmp_path):
    figure = ve.visualisation_suite(data["images"], data["instances"], data["categories"],
                                    data["predictions"], data["root"], [1, 2])
    assert isinstance(figure, Figure) and len(figure.axes) == 8
    titles = _titles(figure)
    assert titles[1] == "ground truth: 2 instances" and titles[5] == "ground truth: 2 instances"
    assert titles[2] == "prediction: 3 instances"  # p4 is below the threshold
    captions = [t.get_text() for t in figure.axes[2].texts]
    assert sorted(captions) == ["circle 0.95", "square 0.80", "square 0.90"]
    legend = [t.get_text() for t in figure.axes[3].get_legend().get_texts()]
    assert legend == ["circle", "square"]
    assert "circle (crowd)" in [t.get_text() for t in figure.axes[5].texts]
    assert _saved_size(figure, tmp_path / "suite.png") > 10_000


def test_visualisation_suite_rejects_unknown_image_ids(data):
    with pytest.raises(ValueError, match=r"\[99\]"):
        ve.visualisation_suite(data["images"], data["instances"], data["categories"],
                               data["predictions"], data["root"], [1, 99])


def test_performance_dashboard_panels(data, tmp_path):
    history, val = _history()
    figure = _dashboard(data, history, val)
    assert isinstance(figure, Figure) and len(figure.axes) == 11  # 7 panels + 4 images
    per_class = _axis_with_title(figure, "AP per class")
    labels = [t.get_text() for t in per_class.get_xticklabels()]
    assert sorted(labels) == ["circle", "square", "triangle"]
    pr = _axis_with_title(figure, "precision–recall")
    legend = [t.get_text() for t in pr.get_legend().get_texts()]
    assert any(text.startswith("IoU .50 (AP") for text in legend) and len(legend) == 3
    histogram = _axis_with_title(figure, "mask IoU of matched")
    assert sum(p.get_height() for p in histogram.patches) == len(data["matches"])
    confusion = _axis_with_title(figure, "GT class vs predicted class")
    assert [t.get_text() for t in confusion.get_yticklabels()][-1] == "background"
    loss = _axis_with_title(figure, "training curves")
    assert "validation loss" in [t.get_text() for t in loss.get_legend().get_texts()]
    assert _saved_size(figure, tmp_path / "dashboard.png") > 10_000


def test_dashboard_ap_bars_carry_the_metric_values(data):
    figure = _dashboard(data)
    bars = _axis_with_title(figure, "COCO AP")
    segm = [p.get_height() for p in bars.containers[0]]
    assert segm[0] == pytest.approx(data["metrics"]["segm"]["mAP"])
    assert segm[1] == pytest.approx(data["metrics"]["segm"]["mAP_50"])


def test_worst_and_best_images_rank_by_f1(data, tmp_path):
    figure = ve.worst_and_best_images(data["images"], data["instances"], data["categories"],
                                      data["predictions"], data["matches"], data["root"], n=2)
    titles = _titles(figure)
    assert len(titles) == 3  # worst: images 3 and 2; best: image 1 (the rest are taken)
    assert titles[0].startswith("image 3 · F1 0.00")
    assert titles[1].startswith("image 2 · F1 0.67")
    assert titles[2].startswith("image 1 · F1 0.80")
    assert "1 wrong class" in titles[0]
    assert _saved_size(figure, tmp_path / "ranked.png") > 10_000


def test_false_positive_gallery_shows_exactly_the_false_positives(data, tmp_path):
    figure = ve.false_positive_gallery(data["images"], data["instances"], data["categories"],
                                       data["predictions"], data["matches"], data["root"])
    assert len(figure.axes) == 1
    title = figure.axes[0].get_title()
    assert title.startswith("square · score 0.80") and "image 1" in title
    assert _saved_size(figure, tmp_path / "fp.png") > 10_000


def test_false_negative_gallery_shows_exactly_the_missed_gt(data, tmp_path):
    figure = ve.false_negative_gallery(data["images"], data["instances"], data["categories"],
                                       data["predictions"], data["matches"], data["root"])
    assert len(figure.axes) == 1
    area = int(data["instances"].set_index("instance_id").loc[22, "area"])
    assert figure.axes[0].get_title().startswith(f"triangle · area {area}\nimage 2")
    assert _saved_size(figure, tmp_path / "fn.png") > 10_000


# ------------------------------------------------------------------ empty inputs

def test_figures_without_any_prediction(empty, tmp_path):
    assert len(empty["matches"]) == 0
    figures = {
        "suite": ve.visualisation_suite(empty["images"], empty["instances"],
                                        empty["categories"], empty["predictions"],
                                        empty["root"], [1, 3]),
        "dashboard": _dashboard(empty),
        "ranked": ve.worst_and_best_images(empty["images"], empty["instances"],
                                           empty["categories"], empty["predictions"],
                                           empty["matches"], empty["root"]),
        "fn": ve.false_negative_gallery(empty["images"], empty["instances"],
                                        empty["categories"], empty["predictions"],
                                        empty["matches"], empty["root"]),
    }
    for name, figure in figures.items():
        assert isinstance(figure, Figure)
        figure.savefig(tmp_path / f"{name}.png", dpi=30)
    histogram = _axis_with_title(figures["dashboard"], "mask IoU of matched")
    assert "no matched" in histogram.texts[0].get_text()
    assert len(figures["dashboard"].axes) == 11
    assert len(figures["fn"].axes) == 5  # all five non-crowd val GT are missed


def test_none_found_figures_say_so(empty):
    figure = ve.false_positive_gallery(empty["images"], empty["instances"],
                                       empty["categories"], empty["predictions"],
                                       empty["matches"], empty["root"])
    assert figure.axes[0].get_title() == "False positives"
    assert figure.axes[0].texts[0].get_text() == "none found: no prediction has score ≥ 0.5"
    nothing = ve.visualisation_suite(empty["images"], empty["instances"],
                                     empty["categories"], empty["predictions"],
                                     empty["root"], [])
    assert "no images" in nothing.axes[0].texts[0].get_text()


def test_module_does_not_import_torch():
    code = ("import sys, instseg_pipeline.viz.evaluation; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_false_positive_gallery_when_every_prediction_matched(data):
    matched = data["predictions"][data["predictions"]["prediction_id"].isin([1, 2, 5, 6])]
    figure = ve.false_positive_gallery(data["images"], data["instances"], data["categories"],
                                       matched, data["matches"], data["root"])
    assert figure.axes[0].texts[0].get_text().startswith("none found: every prediction")
