"""Mask IoU matching, pixel accuracy and semantic IoU on hand-made masks."""
from __future__ import annotations

import numpy as np
import pytest

from instseg_pipeline.evaluation import MetricInputError
from instseg_pipeline.evaluation.matching import (
    mask_iou_matrix,
    match_masks,
    pixel_accuracy,
    semantic_iou,
    to_rles,
)


def _box_mask(shape, y0, y1, x0, x1) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


@pytest.fixture
def masks():
    """GT: A = rows 0-3 x cols 0-3 (16 px), B = rows 6-9 x cols 6-9 (16 px).
    Pred 0 = A shifted right by 1 col (overlap 12, union 20 -> 0.6);
    pred 1 = B exactly (1.0); pred 2 = rows 0-1 x cols 0-7 (overlap with A 8, union 24)."""
    shape = (10, 10)
    gt = np.stack([_box_mask(shape, 0, 4, 0, 4), _box_mask(shape, 6, 10, 6, 10)])
    pred = np.stack([_box_mask(shape, 0, 4, 1, 5), _box_mask(shape, 6, 10, 6, 10),
                     _box_mask(shape, 0, 2, 0, 8)])
    return pred, gt


def test_iou_matrix_matches_hand_computation(masks):
    pred, gt = masks
    expected = np.array([[12 / 20, 0.0], [0.0, 1.0], [8 / 24, 0.0]])
    np.testing.assert_allclose(mask_iou_matrix(pred, gt), expected, rtol=0, atol=1e-12)


def test_iou_matrix_accepts_rles_and_crowd(masks):
    pred, gt = masks
    ious = mask_iou_matrix(to_rles(pred), to_rles(gt), gt_crowd=[True, False])
    # crowd: intersection / prediction area
    assert ious[0, 0] == pytest.approx(12 / 16)
    assert ious[2, 0] == pytest.approx(8 / 16)


def test_hungarian_matching(masks):
    pred, gt = masks
    match = match_masks(pred, gt, iou_threshold=0.5)
    assert match.pred_index.tolist() == [0, 1]
    assert match.gt_index.tolist() == [0, 1]
    np.testing.assert_allclose(match.iou, [0.6, 1.0])
    assert match.mean_iou == pytest.approx(0.8)


def test_threshold_drops_weak_pairs(masks):
    pred, gt = masks
    match = match_masks(pred, gt, iou_threshold=0.7)
    assert match.pred_index.tolist() == [1]
    assert match.iou.tolist() == [1.0]


def test_greedy_follows_scores(masks):
    pred, gt = masks
    # pred 2 has the top score, so it takes A first (IoU 1/3) and pred 0 is left unmatched
    match = match_masks(pred, gt, scores=[0.5, 0.9, 0.95], iou_threshold=0.1, method="greedy")
    assert match.pred_index.tolist() == [1, 2]
    assert match.gt_index.tolist() == [1, 0]
    np.testing.assert_allclose(match.iou, [1.0, 1 / 3])
    hungarian = match_masks(pred, gt, iou_threshold=0.1)
    assert hungarian.pred_index.tolist() == [0, 1]


def test_empty_inputs():
    empty = np.zeros((0, 5, 5), dtype=np.uint8)
    one = _box_mask((5, 5), 0, 2, 0, 2)[None]
    assert mask_iou_matrix(empty, one).shape == (0, 1)
    match = match_masks(one, empty)
    assert match.pred_index.size == 0 and np.isnan(match.mean_iou)


def test_bad_inputs_raise():
    a = _box_mask((5, 5), 0, 2, 0, 2)[None]
    b = _box_mask((6, 5), 0, 2, 0, 2)[None]
    with pytest.raises(MetricInputError, match="share a size"):
        mask_iou_matrix(a, b)
    with pytest.raises(MetricInputError, match="scores"):
        match_masks(a, a, method="greedy")
    with pytest.raises(MetricInputError, match="method"):
        match_masks(a, a, method="nearest")


def test_pixel_accuracy_and_ignore():
    target = np.array([[0, 1, 1], [2, 2, 255]])
    pred = np.array([[0, 1, 2], [2, 0, 1]])
    assert pixel_accuracy(pred, target) == pytest.approx(3 / 6)
    assert pixel_accuracy(pred, target, ignore_index=255) == pytest.approx(3 / 5)
    assert np.isnan(pixel_accuracy(pred, np.full_like(target, 255), ignore_index=255))
    with pytest.raises(MetricInputError, match="shape"):
        pixel_accuracy(pred, target[:1])


def test_semantic_iou():
    target = np.array([[0, 1, 1], [2, 2, 255]])
    pred = np.array([[0, 1, 2], [2, 0, 1]])
    ious = semantic_iou(pred, target, num_classes=4, ignore_index=255)
    # class 0: inter 1, union 2; class 1: inter 1, union 2; class 2: inter 1, union 3
    np.testing.assert_allclose(ious[:3], [1 / 2, 1 / 2, 1 / 3])
    assert np.isnan(ious[3])
