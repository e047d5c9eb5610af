"""The visualisation suite on the error scene (see `error_scene`)."""
from __future__ import annotations

import pytest
from error_scene import saved_size, titles
from matplotlib.figure import Figure

from instseg_pipeline.viz.suite import visualisation_suite


def _suite(d, image_ids):
    return visualisation_suite(d["images"], d["instances"], d["categories"], d["predictions"],
                               d["root"], image_ids)


def test_visualisation_suite_has_four_panels_per_image(data, tmp_path):
    figure = _suite(data, [1, 2])
    assert isinstance(figure, Figure) and len(figure.axes) == 8
    names = titles(figure)
    assert names[1] == "ground truth: 2 instances" and names[5] == "ground truth: 2 instances"
    assert names[2] == "prediction: 3 instances"  # p4 is below the threshold
    captions = [t.get_text() for t in figure.axes[2].texts]
    assert sorted(captions) == ["circle 0.95", "square 0.80", "square 0.90"]
    legend = [t.get_text() for t in figure.axes[3].get_legend().get_texts()]
    assert legend == ["circle", "square"]
    assert "circle (crowd)" in [t.get_text() for t in figure.axes[5].texts]
    assert saved_size(figure, tmp_path / "suite.png") > 10_000


def test_visualisation_suite_rejects_unknown_image_ids(data):
    with pytest.raises(ValueError, match=r"\[99\]"):
        _suite(data, [1, 99])


def test_visualisation_suite_without_any_prediction(empty, tmp_path):
    figure = _suite(empty, [1, 3])
    assert isinstance(figure, Figure)
    figure.savefig(tmp_path / "suite.png", dpi=30)


def test_visualisation_suite_of_no_image_says_so(empty):
    nothing = _suite(empty, [])
    assert "no images" in nothing.axes[0].texts[0].get_text()
