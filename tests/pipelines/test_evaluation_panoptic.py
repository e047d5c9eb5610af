"""Panoptic inference and PQ in the evaluation pipeline, on the panoptic scene
(`panoptic_scene`): an oracle semantic family scores PQ 1 on things and stuff, an instance
family is scored on things only exactly as the things-only code scored it, the
``panoptic_predictions`` dataset round-trips, and `instseg-eval panoptic` reads what it
writes with the same numbers."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from kedro.io import DataCatalog, MemoryDataset, Version
from kedro.runner import SequentialRunner
from panoptic_scene import SMALL_GROUND, build_scene, oracle_registrar

from instseg_pipeline.data.panoptic import write_panoptic
from instseg_pipeline.data.tables import select_split
from instseg_pipeline.evaluation.panoptic import pq_from_tables
from instseg_pipeline.kedro_ext.datasets import PanopticDataset, panoptic_paths
from instseg_pipeline.pipelines.evaluation import create_pipeline, nodes

CONF = Path(__file__).resolve().parents[2] / "conf/base/parameters_evaluation.yml"
GROUPS = ("all", "things", "stuff")


@pytest.fixture
def oracles(monkeypatch):
    """register(scene) -> (semantic oracle model, instance oracle model), for this test."""
    return oracle_registrar(monkeypatch)


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> dict:
    return build_scene(tmp_path_factory.mktemp("panoptic_scene"))


def _params(**panoptic) -> dict:
    params = yaml.safe_load(CONF.read_text())["evaluation"]
    return {**params, "device": "cpu", "batch_size": 2,
            "panoptic": {**params["panoptic"], **panoptic}}


def _source(scene) -> dict:
    return {"type": "synthetic", "root": str(scene["root"])}


def _panoptic(scene, model, params) -> tuple[pd.DataFrame, dict]:
    """(predictions table, panoptic predictions) of ``model`` through the two nodes."""
    tables = scene["images"], scene["categories"]
    predictions = nodes.predict(model, *tables, _source(scene), params)
    panoptic = nodes.predict_panoptic(model, *tables, predictions, _source(scene), params)
    return predictions, panoptic


def _pq(scene, panoptic, params) -> dict:
    return nodes.compute_pq_metrics(scene["images"], scene["instances"],
                                    scene["stuff_segments"], scene["categories"], panoptic,
                                    params)


def _round_trip(panoptic: dict, folder: Path) -> tuple[dict, Path]:
    """Save through a versioned `PanopticDataset` and load back; also the saved folder."""
    dataset = PanopticDataset(filepath=str(folder / "panoptic_predictions"),
                              version=Version(None, None))
    dataset.save(panoptic)
    loaded = PanopticDataset(filepath=str(folder / "panoptic_predictions"),
                             version=Version(None, None))
    saved = next((folder / "panoptic_predictions").iterdir()) / "panoptic_predictions"
    return loaded.load(), saved


def test_semantic_oracle_scores_one_on_things_and_stuff(scene, oracles, tmp_path,
                                                        monkeypatch):
    semantic, _ = oracles(scene)
    logged = {}
    monkeypatch.setattr(nodes.tracking, "log_metrics", logged.update)
    params = _params()
    _, panoptic = _panoptic(scene, semantic, params)
    assert [a["image_id"] for a in panoptic["annotations"]] == [1, 2, 3]  # the val split
    assert {c["id"] for c in panoptic["categories"]} == {1, 2, 5, 6}
    loaded, _ = _round_trip(panoptic, tmp_path)
    result = _pq(scene, loaded, params)
    for group in GROUPS:
        assert result[group]["pq"] == pytest.approx(1.0), (group, result[group])
    # circle, square / sky, ground (the crowd circle is never counted)
    assert (result["things"]["n"], result["stuff"]["n"], result["all"]["n"]) == (2, 2, 4)
    assert result["per_category"]["6"]["tp"] == 3
    assert logged["pq/stuff"] == 1.0 and logged["rq/things"] == 1.0 and logged["sq/all"] == 1.0


def test_instance_model_is_scored_on_things_as_before(scene, oracles, tmp_path, monkeypatch):
    _, instance = oracles(scene)
    logged = {}
    monkeypatch.setattr(nodes.tracking, "log_metrics", logged.update)
    params = _params()
    predictions, panoptic = _panoptic(scene, instance, params)
    assert {c["id"] for c in panoptic["categories"]} == {1, 2}
    loaded, _ = _round_trip(panoptic, tmp_path)
    result = _pq(scene, loaded, params)
    assert result["stuff"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}
    assert result["all"] == result["things"]
    assert 0.3 < result["things"]["pq"] < 0.95  # a miss, a false positive, a dropped copy
    # the things-only code on the same predictions table
    images, instances = select_split(scene["images"], scene["instances"], "val")
    options = {k: params["panoptic"][k]
               for k in ("score_threshold", "overlap_threshold", "min_area")}
    before = pq_from_tables(images, instances, scene["categories"], predictions, **options)
    for group in GROUPS:
        assert result[group] == pytest.approx(before[group]), group
    assert {k: float(v) for k, v in result["per_category"]["2"].items()} == pytest.approx(
        {k: float(v) for k, v in before["per_category"][2].items()})
    assert "pq/stuff" not in logged and logged["pq/all"] == result["all"]["pq"]


def test_stuff_min_area_drops_a_small_stuff_region(scene, oracles):
    semantic, _ = oracles(scene)
    kept = _panoptic(scene, semantic, _params())[1]
    dropped = _panoptic(scene, semantic, _params(stuff_min_area=SMALL_GROUND + 1))[1]

    def categories(panoptic, image_id):
        annotation = next(a for a in panoptic["annotations"] if a["image_id"] == image_id)
        return sorted(s["category_id"] for s in annotation["segments_info"])

    assert 6 in categories(kept, 3) and 6 not in categories(dropped, 3)
    assert categories(dropped, 1) == categories(kept, 1)  # large ground stays
    name = next(a["file_name"] for a in dropped["annotations"] if a["image_id"] == 3)
    ground = next(s for s in next(a for a in kept["annotations"] if a["image_id"] == 3)
                  ["segments_info"] if s["category_id"] == 6)
    assert ground["area"] == SMALL_GROUND
    assert int((dropped["pngs"][name] == 0).sum()) == int((kept["pngs"][name] == 0).sum()) \
        + SMALL_GROUND  # the strip became void
    result = _pq(scene, dropped, _params())
    assert result["per_category"]["6"]["fn"] == 1 and result["stuff"]["pq"] < 1.0


def test_dataset_round_trip_and_refusals(scene, tmp_path):
    ids = np.zeros((4, 5), np.int32)
    ids[1:3, 1:4] = 2
    ids[0, 0] = 70000  # needs all three channels
    data = {"annotations": [{"image_id": 7, "file_name": "a.png", "segments_info": [
        {"id": 2, "category_id": 1, "iscrowd": 0, "area": 6, "bbox": [1, 1, 3, 2]},
        {"id": 70000, "category_id": 5, "iscrowd": 0, "area": 1, "bbox": [0, 0, 1, 1]}]}],
        "categories": [{"id": 1, "name": "circle", "isthing": 1}], "pngs": {"a.png": ids}}
    loaded, saved = _round_trip(data, tmp_path)
    assert loaded["annotations"] == data["annotations"]
    assert loaded["categories"] == data["categories"]
    assert list(loaded["pngs"]) == ["a.png"]
    np.testing.assert_array_equal(loaded["pngs"]["a.png"], ids)
    json_path, png_folder = panoptic_paths(saved)
    assert json_path.is_file() and (png_folder / "a.png").is_file()
    assert [p.name for p in saved.parent.iterdir()] == ["panoptic_predictions"]  # no leftovers
    plain = PanopticDataset(filepath=str(tmp_path / "plain"))  # unversioned: overwritten
    plain.save(data)
    plain.save({**data, "pngs": {"a.png": ids * 0}})
    assert not plain.load()["pngs"]["a.png"].any()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["panoptic_predictions", "plain"]
    dataset = PanopticDataset(filepath=str(tmp_path / "other"))
    with pytest.raises(Exception, match=r"no id map for image 7 \(a.png\)"):
        dataset.save({**data, "pngs": {}})
    with pytest.raises(Exception, match=r"id maps \['b.png'\] belong to no annotation"):
        dataset.save({**data, "pngs": {"a.png": ids, "b.png": ids}})
    with pytest.raises(Exception, match="not plain file names"):
        dataset.save({**data, "annotations": [{**data["annotations"][0],
                                               "file_name": "../a.png"}],
                      "pngs": {"../a.png": ids}})
    assert not (tmp_path / "other").exists()


def _cli(*args: str) -> dict:
    command = [sys.executable, "-m", "instseg_pipeline.commands.evaluate", "panoptic",
               *args, "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("semantic", [True, False], ids=["semantic", "instance"])
def test_cli_reads_the_saved_predictions_with_the_same_numbers(scene, oracles, tmp_path,
                                                               semantic):
    model = oracles(scene)[0 if semantic else 1]
    params = _params()
    _, panoptic = _panoptic(scene, model, params)
    loaded, saved = _round_trip(panoptic, tmp_path)
    expected = _pq(scene, loaded, params)
    images = scene["images"][scene["images"]["split"] == "val"]
    segments = scene["instances"]
    if semantic:  # an instance model is scored on things only: its GT has no stuff
        segments = pd.concat([segments, scene["stuff_segments"]], ignore_index=True)
    segments = segments[segments["image_id"].isin(images["image_id"])]
    write_panoptic(images, segments, scene["categories"], tmp_path / "gt", tmp_path / "gt.json")
    gt = ["--gt-json", str(tmp_path / "gt.json"), "--gt-folder", str(tmp_path / "gt")]
    json_path, png_folder = panoptic_paths(saved)
    by_files = _cli(*gt, "--pred-json", str(json_path), "--pred-folder", str(png_folder))
    by_dir = _cli(*gt, "--pred-dir", str(saved))
    for group in GROUPS:
        assert by_files[group] == pytest.approx(expected[group]), group
    assert by_dir == by_files
    assert (by_files["stuff"]["n"] > 0) == semantic


def test_pipeline_writes_panoptic_predictions_and_feeds_pq_figure_and_dashboard(
        scene, oracles, tmp_path, monkeypatch):
    semantic, _ = oracles(scene)
    monkeypatch.setattr(nodes.tracking, "log_metrics", lambda *a, **k: False)
    monkeypatch.setattr(nodes.tracking, "log_figure", lambda *a, **k: False)
    pipeline = create_pipeline().from_inputs("model").to_outputs(
        "pq_metrics", "panoptic_overlay")
    assert {n.name for n in pipeline.nodes} == {"predict", "predict_panoptic",
                                                "compute_pq_metrics", "plot_panoptic_overlay"}
    catalog = DataCatalog({
        "model": MemoryDataset(semantic), "images": MemoryDataset(scene["images"]),
        "instances": MemoryDataset(scene["instances"]),
        "stuff_segments": MemoryDataset(scene["stuff_segments"]),
        "categories": MemoryDataset(scene["categories"]),
        "params:source": MemoryDataset(_source(scene)),
        "params:evaluation": MemoryDataset(_params()),
        "panoptic_predictions": PanopticDataset(
            filepath=str(tmp_path / "panoptic_predictions"), version=Version(None, None)),
        "pq_metrics": MemoryDataset(), "panoptic_overlay": MemoryDataset()})
    SequentialRunner().run(pipeline, catalog)
    assert catalog.load("pq_metrics")["all"]["pq"] == pytest.approx(1.0)
    figure = catalog.load("panoptic_overlay")
    assert len(figure.axes) == 9  # 3 val images x image | GT | prediction
    dashboard = [n for n in create_pipeline().nodes if n.name == "plot_performance_dashboard"]
    assert "pq_metrics" in dashboard[0].inputs


def test_a_semantic_model_without_its_stuff_mapping_is_refused(scene, oracles):
    semantic, _ = oracles(scene)
    predictions = nodes.predict(semantic, scene["images"], scene["categories"],
                                _source(scene), _params())
    broken = {k: v for k, v in semantic.items() if k != "stuff_category_ids"}
    with pytest.raises(ValueError, match="oracle_panoptic is of a semantic family but its "
                                         "model file has no stuff_category_ids"):
        nodes.predict_panoptic(broken, scene["images"], scene["categories"], predictions,
                               _source(scene), _params())
    no_stuff = nodes.predict_panoptic({**semantic, "stuff_category_ids": {}}, scene["images"],
                                      scene["categories"], predictions, _source(scene),
                                      _params())
    assert {c["id"] for c in no_stuff["categories"]} == {1, 2}


def _without_first_thing(panoptic: dict) -> dict:
    """The predictions less one thing segment (its pixels void): a PQ below 1."""
    annotations = [dict(a) for a in panoptic["annotations"]]
    thing_ids = {int(c["id"]) for c in panoptic["categories"] if c["isthing"]}
    for annotation in annotations:
        things = [s for s in annotation["segments_info"] if s["category_id"] in thing_ids]
        if things:
            dropped = things[0]["id"]
            annotation["segments_info"] = [s for s in annotation["segments_info"]
                                           if s["id"] != dropped]
            ids = np.array(panoptic["pngs"][annotation["file_name"]], copy=True)
            ids[ids == dropped] = 0
            pngs = {**panoptic["pngs"], annotation["file_name"]: ids}
            return {**panoptic, "annotations": annotations, "pngs": pngs}
    raise AssertionError("no thing segment to drop")


@pytest.mark.parametrize("semantic", [True, False], ids=["semantic", "instance"])
def test_saved_ground_truth_and_predictions_reproduce_pq_metrics_by_cli(
        scene, oracles, tmp_path, semantic):
    model = oracles(scene)[0 if semantic else 1]
    params = _params()
    _, panoptic = _panoptic(scene, model, params)
    panoptic = _without_first_thing(panoptic)
    expected = _pq(scene, panoptic, params)
    assert expected["things"]["pq"] < 1.0
    tables = (scene["images"], scene["instances"], scene["stuff_segments"],
              scene["categories"])
    ground_truth = nodes.write_panoptic_ground_truth(*tables, panoptic, params)
    _, pred_dir = _round_trip(panoptic, tmp_path / "pred")
    gt_set = PanopticDataset(filepath=str(tmp_path / "gt" / "panoptic_ground_truth"),
                             version=Version(None, None))
    gt_set.save(ground_truth)
    gt_dir = next((tmp_path / "gt" / "panoptic_ground_truth").iterdir()) / \
        "panoptic_ground_truth"
    by_cli = _cli("--gt-dir", str(gt_dir), "--pred-dir", str(pred_dir))
    for group in GROUPS:
        assert by_cli[group] == pytest.approx(expected[group]), group
    assert (by_cli["stuff"]["n"] > 0) == semantic


def test_cli_refuses_a_half_given_ground_truth(tmp_path):
    command = [sys.executable, "-m", "instseg_pipeline.commands.evaluate", "panoptic",
               "--gt-dir", str(tmp_path), "--gt-json", str(tmp_path / "gt.json"),
               "--pred-dir", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2
    assert "--gt-dir replaces --gt-json and --gt-folder" in done.stderr
