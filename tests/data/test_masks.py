"""RLE checks that pycocotools skips: run-length sums of compressed strings, both paths."""
from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from instseg_pipeline.data import masks


@pytest.mark.parametrize("vectorise_from", [0, 10**9])  # numpy path, plain-loop path
def test_compressed_counts_sum_matches_the_mask_size(monkeypatch, vectorise_from):
    monkeypatch.setattr(masks, "_VECTORISE_FROM", vectorise_from)
    rng = np.random.default_rng(0)
    for _ in range(100):
        height, width = rng.integers(1, 300, 2)
        bitmap = (rng.random((height, width)) > rng.random()).astype(np.uint8)
        rle = mask_utils.encode(np.asfortranarray(bitmap))
        assert masks.compressed_counts_sum(rle["counts"]) == height * width


@pytest.mark.parametrize("vectorise_from", [0, 10**9])
def test_malformed_compressed_strings_are_rejected(monkeypatch, vectorise_from):
    monkeypatch.setattr(masks, "_VECTORISE_FROM", vectorise_from)
    with pytest.raises(masks.GeometryError, match="invalid byte"):
        masks.compressed_counts_sum(b"ab\x01")
    with pytest.raises(masks.GeometryError, match="ends inside"):
        masks.compressed_counts_sum(b"0o")  # 'o' carries the continuation bit
    problem = masks.segmentation_problem({"size": [4, 4], "counts": "02"}, 4, 4)
    assert problem[0] == "rle_counts_sum"
