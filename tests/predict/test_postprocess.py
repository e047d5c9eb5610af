"""The one preprocessing, postprocessing and device rule of every inference entry point."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from instseg_pipeline.data.masks import rle_area, rle_bbox, string_to_rle
from instseg_pipeline.predict.batch import same_size_batches
from instseg_pipeline.predict.device import resolve_device
from instseg_pipeline.predict.postprocess import instance_dicts, postprocess, table_rows
from instseg_pipeline.predict.preprocess import to_chw, to_tensor

H, W = 6, 8


def _raw(scores: list[float], masks: np.ndarray, labels: list[int] | None = None) -> dict:
    """Raw outputs of ``len(scores)`` detections; masks float32 [N, H, W] probabilities."""
    n = len(scores)
    boxes = np.tile(np.array([[1.0, 1.0, 5.5, 4.5]], np.float32), (n, 1)) + np.arange(n)[:, None]
    return {"boxes": boxes, "labels": np.array(labels or [1] * n, np.int64),
            "scores": np.array(scores, np.float32),
            "masks": masks.astype(np.float32).reshape(n, 1, H, W)}


def _square(value: float, y: int = 1, x: int = 2) -> np.ndarray:
    """float32 [H, W]: ``value`` on a 3x3 square at (y, x), 0.1 elsewhere."""
    mask = np.full((H, W), 0.1, np.float32)
    mask[y:y + 3, x:x + 3] = value
    return mask


def test_thresholds_keep_values_exactly_at_the_boundary():
    """score == score_threshold and probability == mask_threshold both count (>=); the old
    predictor's ``>`` rule dropped these pixels and would fail here."""
    raw = _raw([0.5, 0.3], np.stack([_square(0.5), _square(0.9)]))
    found = postprocess(raw, score_threshold=0.5, mask_threshold=0.5)
    assert len(found) == 1 and found.scores.tolist() == [0.5]
    assert found.masks.dtype == np.uint8 and found.masks.shape == (1, H, W)
    assert found.masks[0].sum() == 9 and found.areas.tolist() == [9]
    assert found.bboxes.tolist() == [[2.0, 1.0, 3.0, 3.0]]  # COCO x, y, w, h of the mask


def test_a_mask_below_the_threshold_everywhere_is_dropped_and_logged(caplog):
    raw = _raw([0.9, 0.8, 0.7], np.stack([_square(0.8), _square(0.49), _square(0.6, 2, 4)]))
    with caplog.at_level(logging.DEBUG, logger="instseg_pipeline.predict.postprocess"):
        found = postprocess(raw, score_threshold=0.05, mask_threshold=0.5)
    assert found.scores.tolist() == pytest.approx([0.9, 0.7])
    assert found.boxes[:, 0].tolist() == [1.0, 3.0]  # boxes follow their instances
    assert len(found.rles) == len(found.masks) == len(found.labels) == 2
    assert "1 of 3 instances dropped: empty mask" in caplog.text


def test_instances_are_best_first_and_ties_keep_the_model_order():
    masks = np.stack([_square(0.9, 0, x) for x in range(5)])
    raw = _raw([0.2, 0.7, 0.4, 0.7, 0.4], masks, labels=[1, 2, 1, 1, 2])
    found = postprocess(raw, score_threshold=0.0, mask_threshold=0.5)
    assert found.scores.tolist() == pytest.approx([0.7, 0.7, 0.4, 0.4, 0.2])
    assert found.boxes[:, 0].tolist() == [2.0, 4.0, 3.0, 5.0, 1.0]  # model order 1, 3, 2, 4, 0
    assert found.labels.tolist() == [2, 1, 1, 2, 1]


def test_torch_outputs_give_what_numpy_outputs_give():
    """The batch path hands over torch tensors (masks thresholded where they are)."""
    raw = _raw([0.6, 0.9], np.stack([_square(0.5), _square(0.7, 2, 4)]))
    from_numpy = postprocess(raw, 0.05, 0.5)
    from_torch = postprocess({k: torch.from_numpy(v) for k, v in raw.items()}, 0.05, 0.5)
    assert from_torch.rles == from_numpy.rles
    np.testing.assert_array_equal(from_torch.masks, from_numpy.masks)
    np.testing.assert_array_equal(from_torch.scores, from_numpy.scores)


def test_no_detections():
    found = postprocess(_raw([], np.zeros((0, H, W))), 0.05, 0.5)
    assert len(found) == 0 and found.masks.shape == (0, H, W) and found.bboxes.shape == (0, 4)
    assert table_rows(found, 3, {1: 1}) == [] and instance_dicts(found, {1: "a"}) == []


def test_table_rows_and_instance_dicts_hold_the_same_instances():
    raw = _raw([0.6, 0.9], np.stack([_square(0.5), _square(0.7, 2, 4)]), labels=[1, 2])
    found = postprocess(raw, 0.05, 0.5)
    rows = table_rows(found, image_id=7, label_to_category={1: 10, 2: 20})
    instances = instance_dicts(found, {1: "disk", 2: "square"}, polygons=True)
    assert [r["category_id"] for r in rows] == [20, 10]
    assert [i["category_name"] for i in instances] == ["square", "disk"]
    for row, instance in zip(rows, instances):
        rle = string_to_rle(row["rle"], H, W)
        assert instance["rle"] == {"size": [H, W], "counts": row["rle"]}
        assert row["bbox"] == instance["bbox"] == rle_bbox(rle)
        assert row["area"] == instance["area"] == rle_area(rle)
        assert row["score"] == instance["score"] and (row["height"], row["width"]) == (H, W)
        assert instance["polygon"] and instance["box"] != instance["bbox"]


def test_to_chw_is_the_network_input():
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 14
    chw = to_chw(image)
    assert chw.dtype == np.float32 and chw.shape == (3, 2, 3) and chw.flags.writeable
    np.testing.assert_array_equal(chw, image.transpose(2, 0, 1).astype(np.float32) / 255)
    # the same numbers as torch's float32 division, which the batch path used to do
    assert torch.equal(to_tensor(image), torch.from_numpy(image).permute(2, 0, 1).float() / 255)
    with pytest.raises(ValueError, match=r"uint8 \[H, W, 3\], got float32 \(2, 3, 3\)"):
        to_chw(image.astype(np.float32))
    with pytest.raises(ValueError, match=r"got uint8 \(2, 3\)"):
        to_chw(image[..., 0])


def test_batches_hold_one_image_size():
    import pandas as pd

    images = pd.DataFrame({"height": [10, 20, 10, 10, 20, 10], "width": [5, 5, 5, 5, 5, 5]})
    assert same_size_batches(images, 2) == [[0, 2], [3, 5], [1, 4]]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine")
def test_device_rule_without_cuda():
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu")
    with pytest.raises(ValueError, match="evaluation.device is 'cuda' but CUDA is not"):
        resolve_device("cuda", setting="evaluation.device")
    with pytest.raises(ValueError, match="--device is 'cuda:1' but CUDA is not"):
        resolve_device("cuda:1", setting="--device")
    with pytest.raises(ValueError, match="device 'gpu' is not a device"):
        resolve_device("gpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_rule_with_cuda(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count() - 1))
    expected = torch.device("cuda", torch.cuda.device_count() - 1)
    assert resolve_device("auto") == resolve_device("cuda") == expected
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device("cpu") == torch.device("cpu")
