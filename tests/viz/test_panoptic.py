"""The panoptic overlay on the panoptic scene (`panoptic_scene`), with the GT-perfect
semantic oracle's predictions and with things-only predictions."""
from __future__ import annotations

import numpy as np
import pytest
from error_scene import saved_size
from matplotlib.colors import rgb_to_hsv
from matplotlib.figure import Figure
from panoptic_scene import build_scene, oracle_registrar

from instseg_pipeline.pipelines.evaluation import nodes
from instseg_pipeline.viz.panoptic import panoptic_overlay

PARAMS = {"device": "cpu", "batch_size": 2}


@pytest.fixture
def oracles(monkeypatch):
    """register(scene) -> (semantic oracle model, instance oracle model), for this test."""
    return oracle_registrar(monkeypatch)


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> dict:
    return build_scene(tmp_path_factory.mktemp("panoptic_viz"))


def _predicted(scene, model) -> dict:
    tables = scene["images"], scene["categories"]
    source = {"type": "synthetic", "root": str(scene["root"])}
    predictions = nodes.predict(model, *tables, source, PARAMS)
    return nodes.predict_panoptic(model, *tables, predictions, source, PARAMS)


def _overlay(scene, panoptic, ids):
    return panoptic_overlay(scene["images"], scene["instances"], scene["stuff_segments"],
                            scene["categories"], panoptic, scene["root"], ids)


def test_rows_of_image_gt_and_prediction_with_names_and_legend(scene, oracles, tmp_path):
    semantic, _ = oracles(scene)
    figure = _overlay(scene, _predicted(scene, semantic), [1, 2])
    assert isinstance(figure, Figure) and len(figure.axes) == 6
    titles = [ax.get_title() for ax in figure.axes]
    assert titles[0] == "image 1"
    assert titles[1] == "ground truth: 2 things, 2 stuff segments"
    assert titles[2] == "prediction: 2 things, 2 stuff segments"
    assert titles[4].startswith("ground truth: 2 things")  # a square and the crowd circle
    captions = {t.get_text() for t in figure.axes[4].texts}
    assert {"square", "circle (crowd)", "sky", "ground"} <= captions
    legend = [t.get_text() for t in figure.axes[2].get_legend().get_texts()]
    assert legend == ["circle", "square", "sky (stuff)", "ground (stuff)"]
    assert saved_size(figure, tmp_path / "overlay.png") > 10_000


def test_stuff_is_muted_and_things_bright(scene, oracles):
    semantic, _ = oracles(scene)
    figure = _overlay(scene, _predicted(scene, semantic), [1])
    legend = figure.axes[2].get_legend()
    saturation = {t.get_text(): rgb_to_hsv(np.asarray(p.get_facecolor()[:3]))[1]
                  for t, p in zip(legend.get_texts(), legend.get_patches())}
    assert min(saturation["circle"], saturation["square"]) > \
        max(saturation["sky (stuff)"], saturation["ground (stuff)"])


def test_things_only_prediction_and_bad_requests(scene, oracles):
    _, instance = oracles(scene)
    panoptic = _predicted(scene, instance)
    figure = _overlay(scene, panoptic, [3])
    assert len(figure.axes) == 3
    assert figure.axes[2].get_title() == "prediction: 2 things, 0 stuff segments"
    assert len(_overlay(scene, panoptic, []).axes) == 1  # a notice
    with pytest.raises(ValueError, match=r"image ids \[9\] are not in the images table"):
        _overlay(scene, panoptic, [9])
    with pytest.raises(ValueError, match=r"images \[4\] have no panoptic prediction"):
        _overlay(scene, panoptic, [4])  # train image: not predicted
