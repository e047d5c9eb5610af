"""Pseudo-masks are not evaluation ground truth: every metric built from the tables refuses
them (how many, which annotation ids, which methods, the parameter to set) unless
``evaluation.allow_pseudo_masks`` is true, which scores them with one WARNING."""
from __future__ import annotations

import logging

import pandas as pd
import pytest
from scene_shapes import instance_row, rect

from instseg_pipeline.config_schema import ConfigError
from instseg_pipeline.data.tables import make_categories, make_images, make_instances
from instseg_pipeline.evaluation import ground_truth
from instseg_pipeline.evaluation.config import EvaluationConfig
from instseg_pipeline.evaluation.ground_truth import PseudoMaskError, check_pseudo_masks
from instseg_pipeline.evaluation.metrics import coco_metrics, matched_mask_ious
from instseg_pipeline.evaluation.pixels import pixel_metrics

H, W = 40, 60
# (annotation id, image id, mask_source): eight val instances, six of them pseudo-masks
VAL = [(101, 1, "grabcut"), (102, 1, "annotated"), (103, 1, "box"), (104, 2, "grabcut"),
       (105, 2, "grabcut"), (106, 2, "sam"), (107, 2, "annotated"), (108, 2, "box")]


@pytest.fixture(autouse=True)
def fresh_warnings():
    ground_truth._warned.clear()
    yield
    ground_truth._warned.clear()


def _box(k: int):
    """A distinct small rectangle per index (no two overlap)."""
    x0, y0 = 2 + (k % 4) * 14, 2 + (k // 4) * 18
    return rect(H, W, x0, y0, x0 + 10, y0 + 12)


def _tables(val=VAL):
    images = make_images([
        {"image_id": i, "file_name": f"{i}.png", "width": W, "height": H,
         "split": "train" if i == 3 else "val", "source": "test"} for i in (1, 2, 3)])
    rows = []
    for k, (annotation_id, image_id, source) in enumerate(val):
        row = instance_row(k + 1, image_id, 1, _box(k))
        rows.append({**row, "annotation_id": annotation_id, "mask_source": source})
    # a train-split pseudo-mask is none of evaluation's business
    rows.append({**instance_row(99, 3, 1, _box(0)), "annotation_id": 999,
                 "mask_source": "box"})
    categories = make_categories([{"category_id": 1, "name": "thing", "supercategory": "x",
                                   "isthing": True}])
    return images, make_instances(rows), categories


def _perfect_predictions(instances: pd.DataFrame) -> pd.DataFrame:
    """One prediction per val instance, its exact mask, score 0.9."""
    val = instances[instances["image_id"] != 3]
    return pd.DataFrame({
        "prediction_id": range(1, len(val) + 1), "image_id": val["image_id"].to_numpy(),
        "category_id": val["category_id"].to_numpy(), "label": 1, "score": 0.9,
        "bbox": list(val["bbox"]), "area": val["area"].to_numpy(),
        "rle": val["rle"].astype(str).to_numpy(), "height": H, "width": W})


def test_refusal_names_count_ids_methods_and_parameter():
    images, instances, categories = _tables()
    with pytest.raises(PseudoMaskError) as info:
        coco_metrics(images, instances, categories, _perfect_predictions(instances), "val")
    message = str(info.value)
    assert "6 of 8 instances of the val split have pseudo-masks" in message
    assert "box 2, grabcut 3, sam 1" in message
    # the first five annotation ids, in table order, and how many more
    assert "annotation ids 101, 103, 104, 105, 106 and 1 more" in message
    assert "108" not in message and "102" not in message and "999" not in message
    assert "evaluation.allow_pseudo_masks: true" in message


def test_allowed_scores_them_with_one_warning(caplog):
    images, instances, categories = _tables()
    predictions = _perfect_predictions(instances)
    with caplog.at_level(logging.WARNING, logger="instseg_pipeline.evaluation.ground_truth"):
        result = coco_metrics(images, instances, categories, predictions, "val",
                              iou_types=("segm",), allow_pseudo_masks=True)
        pixels = pixel_metrics(images, instances, predictions, "val",
                               allow_pseudo_masks=True)
    assert result["metrics"]["segm"]["mAP"] == pytest.approx(1.0)
    assert pixels["mean_mask_iou"] == pytest.approx(1.0) and pixels["gt_instances"] == 8
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert "6 of 8 instances of the val split have pseudo-masks" in text
    assert "annotation ids 101, 103, 104, 105, 106" in text
    assert "evaluation.allow_pseudo_masks: true" in text


def test_annotated_val_passes_silently(caplog):
    annotated = [(a, i, "annotated") for a, i, _ in VAL]
    images, instances, categories = _tables(annotated)
    with caplog.at_level(logging.WARNING):
        result = coco_metrics(images, instances, categories, _perfect_predictions(instances),
                              "val", iou_types=("segm",))
    assert result["metrics"]["segm"]["mAP"] == pytest.approx(1.0)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_tables_without_the_column_pass():
    images, instances, categories = _tables()
    plain = instances.drop(columns="mask_source")
    check_pseudo_masks(plain)
    result = coco_metrics(images, plain, categories, _perfect_predictions(plain), "val",
                          iou_types=("segm",))
    assert result["metrics"]["segm"]["mAP"] == pytest.approx(1.0)


@pytest.mark.parametrize("metric", ["matched_mask_ious", "pixel_metrics"])
def test_other_table_metrics_refuse_too(metric):
    images, instances, _ = _tables()
    function = {"matched_mask_ious": matched_mask_ious, "pixel_metrics": pixel_metrics}[metric]
    with pytest.raises(PseudoMaskError, match="6 of 8 instances"):
        function(images, instances, _perfect_predictions(instances), "val")


def test_a_crowd_pseudo_row_counts_like_any_other():
    images, instances, categories = _tables([(201, 1, "annotated"), (202, 1, "sam")])
    instances.loc[instances["annotation_id"] == 202, "iscrowd"] = True
    with pytest.raises(PseudoMaskError, match=r"1 of 2 instances.*sam 1.*annotation ids 202"):
        coco_metrics(images, instances, categories, _perfect_predictions(instances), "val")


def test_evaluation_config_key():
    assert EvaluationConfig.from_params({}).allow_pseudo_masks is False
    assert EvaluationConfig.from_params({"allow_pseudo_masks": True}).allow_pseudo_masks
    with pytest.raises(ConfigError, match="evaluation.allow_pseudo_masks"):
        EvaluationConfig.from_params({"allow_pseudo_masks": "maybe"})


def test_coco_ground_truth_for_model_selection_warns_with_its_reason(caplog):
    images, instances, categories = _tables()
    val = images[images["split"] == "val"]
    with caplog.at_level(logging.WARNING, logger="instseg_pipeline.evaluation.ground_truth"):
        gt = ground_truth.coco_ground_truth(val, instances, categories,
                                            allow_pseudo_masks=True,
                                            allowed_by="model selection")
    assert len(gt.getAnnIds()) == 8
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "(model selection)" in warning.getMessage()


def test_the_evaluation_node_reads_the_parameter():
    from instseg_pipeline.pipelines.evaluation.nodes import compute_coco_metrics

    images, instances, categories = _tables()
    predictions = _perfect_predictions(instances)
    with pytest.raises(PseudoMaskError, match="evaluation.allow_pseudo_masks"):
        compute_coco_metrics(images, instances, categories, predictions, {})
    metrics, _ = compute_coco_metrics(images, instances, categories, predictions,
                                      {"allow_pseudo_masks": True, "iou_types": ["segm"]})
    assert metrics["segm"]["mAP"] == pytest.approx(1.0)
