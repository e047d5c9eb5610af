"""Worst / best images and the false-positive / false-negative galleries on the error scene
(see `error_scene`)."""
from __future__ import annotations

from error_scene import saved_size, titles
from matplotlib.figure import Figure

from instseg_pipeline.viz import galleries


def _args(d, predictions=None):
    predictions = d["predictions"] if predictions is None else predictions
    return (d["images"], d["instances"], d["categories"], predictions, d["matches"], d["root"])


def test_worst_and_best_images_rank_by_f1(data, tmp_path):
    figure = galleries.worst_and_best_images(*_args(data), n=2)
    names = titles(figure)
    assert len(names) == 3  # worst: images 3 and 2; best: image 1 (the rest are taken)
    assert names[0].startswith("image 3 · F1 0.00")
    assert names[1].startswith("image 2 · F1 0.67")
    assert names[2].startswith("image 1 · F1 0.80")
    assert "1 wrong class" in names[0]
    assert saved_size(figure, tmp_path / "ranked.png") > 10_000


def test_false_positive_gallery_shows_exactly_the_false_positives(data, tmp_path):
    figure = galleries.false_positive_gallery(*_args(data))
    assert len(figure.axes) == 1
    title = figure.axes[0].get_title()
    assert title.startswith("square · score 0.80") and "image 1" in title
    assert saved_size(figure, tmp_path / "fp.png") > 10_000


def test_false_negative_gallery_shows_exactly_the_missed_gt(data, tmp_path):
    figure = galleries.false_negative_gallery(*_args(data))
    assert len(figure.axes) == 1
    area = int(data["instances"].set_index("instance_id").loc[22, "area"])
    assert figure.axes[0].get_title().startswith(f"triangle · area {area}\nimage 2")
    assert saved_size(figure, tmp_path / "fn.png") > 10_000


def test_galleries_without_any_prediction(empty, tmp_path):
    assert len(empty["matches"]) == 0
    figures = {"ranked": galleries.worst_and_best_images(*_args(empty)),
               "fn": galleries.false_negative_gallery(*_args(empty))}
    for name, figure in figures.items():
        assert isinstance(figure, Figure)
        figure.savefig(tmp_path / f"{name}.png", dpi=30)
    assert len(figures["fn"].axes) == 5  # all five non-crowd val GT are missed


def test_none_found_figures_say_so(empty):
    figure = galleries.false_positive_gallery(*_args(empty))
    assert figure.axes[0].get_title() == "False positives"
    assert figure.axes[0].texts[0].get_text() == "none found: no prediction has score ≥ 0.5"


def test_false_positive_gallery_when_every_prediction_matched(data):
    matched = data["predictions"][data["predictions"]["prediction_id"].isin([1, 2, 5, 6])]
    figure = galleries.false_positive_gallery(*_args(data, matched))
    assert figure.axes[0].texts[0].get_text().startswith("none found: every prediction")
