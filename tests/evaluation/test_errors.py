"""Error-analysis tables on the error scene (see `error_scene`): which predictions are false
positives, which GT was missed, per-image scores and the class confusions."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from error_scene import THRESHOLD, build_scene

from instseg_pipeline.evaluation import errors


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    return build_scene(tmp_path_factory.mktemp("error_scene"))


def test_matching_behind_the_scene_is_as_designed(data):
    pairs = set(zip(data["matches"]["prediction_id"], data["matches"]["instance_id"]))
    assert pairs == {(1, 11), (2, 12), (5, 21), (6, 31)}


def test_false_positives_are_the_unmatched_confident_predictions(data):
    found = errors.false_positives(data["predictions"], data["matches"], THRESHOLD)
    assert found["prediction_id"].tolist() == [3, 8]  # highest score first
    outside_crowd = errors.false_positives(data["predictions"], data["matches"], THRESHOLD,
                                           instances=data["instances"])
    assert outside_crowd["prediction_id"].tolist() == [3]
    everything = errors.false_positives(data["predictions"], data["matches"], 0.0,
                                        instances=data["instances"])
    assert everything["prediction_id"].tolist() == [3, 4]


def test_in_crowd_flags_only_the_prediction_on_the_crowd_region(data):
    flags = errors.in_crowd(data["predictions"], data["instances"])
    assert data["predictions"]["prediction_id"][flags].tolist() == [8]


def test_false_negatives_are_unmatched_non_crowd_gt_of_the_split(data):
    val = errors.split_images(data["images"], "val")
    found = errors.false_negatives(data["instances"], data["matches"], val)
    assert found["instance_id"].tolist() == [22]
    everywhere = errors.false_negatives(data["instances"], data["matches"], data["images"])
    assert sorted(everywhere["instance_id"]) == [22, 41]


def test_image_scores_count_found_missed_and_confused(data):
    val = errors.split_images(data["images"], "val")
    scores = errors.image_scores(val, data["instances"], data["predictions"], data["matches"],
                                 THRESHOLD).set_index("image_id")
    assert scores.loc[[1, 2, 3], "ground_truth"].tolist() == [2, 2, 1]
    assert scores.loc[[1, 2, 3], "predicted"].tolist() == [3, 1, 1]  # p4 low, p8 in crowd
    assert scores.loc[[1, 2, 3], "correct"].tolist() == [2, 1, 0]
    assert scores["f1"].round(6).tolist() == [0.8, round(2 / 3, 6), 0.0]
    assert scores.loc[2, "recall"] == 0.5 and scores.loc[1, "precision"] == pytest.approx(2 / 3)
    assert scores.loc[1, "mean_iou"] == pytest.approx(
        data["matches"].set_index("image_id").loc[1, "iou"].mean())


def _expected_confusion() -> np.ndarray:
    expected = np.zeros((4, 4), dtype=np.int64)
    expected[0, 0] = expected[0, 1] = 1   # circle found; circle called square
    expected[1, 1] = 2                    # two squares found
    expected[2, 3] = 1                    # triangle missed
    expected[3, 1] = 1                    # background called square
    return expected


def test_confusion_counts_place_matches_false_positives_and_misses(data):
    val = errors.split_images(data["images"], "val")
    fp = errors.false_positives(data["predictions"], data["matches"], THRESHOLD,
                                data["instances"])
    fn = errors.false_negatives(data["instances"], data["matches"], val)
    counts = errors.confusion_counts(data["categories"], data["matches"], fp, fn)
    assert counts.index.tolist() == ["circle", "square", "triangle", "background"]
    assert counts.columns.tolist() == ["circle", "square", "triangle", "missed"]
    np.testing.assert_array_equal(counts.to_numpy(), _expected_confusion())


def test_detection_confusion_counts_only_the_split_images(data):
    # Image 4 (train) has a missed square; with all images it would add a "missed" square.
    val = errors.split_images(data["images"], "val")
    counts = errors.detection_confusion(data["categories"], data["predictions"], val,
                                        data["instances"], data["matches"], THRESHOLD)
    np.testing.assert_array_equal(counts.to_numpy(), _expected_confusion())
    everywhere = errors.detection_confusion(data["categories"], data["predictions"],
                                            data["images"], data["instances"],
                                            data["matches"], THRESHOLD)
    assert everywhere.loc["square", "missed"] == 1


def test_module_imports_neither_torch_nor_matplotlib():
    code = ("import sys, instseg_pipeline.evaluation.errors; "
            "sys.exit(1 if {'torch', 'matplotlib'} & set(sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
