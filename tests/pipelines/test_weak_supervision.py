"""The ``weak_supervision`` pipeline on hand-made scenes: pseudo-mask quality with the real
pseudo-mask functions (a filled box scores below GrabCut on high-contrast discs, COCO size
buckets and counts), the four mask variants trained at one tiny budget and evaluated on the
annotated val masks, the configuration, and the pipeline's registration and catalog."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from kedro.config import OmegaConfigLoader
from PIL import Image
from scene_shapes import circle, instance_row

from instseg_pipeline.comparison import mask_quality
from instseg_pipeline.comparison import weak_supervision as weak
from instseg_pipeline.comparison.weak_config import BudgetConfig, WeakSupervisionConfig
from instseg_pipeline.config_schema import ConfigError
from instseg_pipeline.data.tables import make_categories, make_images, make_instances
from instseg_pipeline.pipelines.weak_supervision.nodes import (
    compare_weak_supervision,
    measure_pseudo_mask_quality,
    plot_pseudo_mask_quality,
    plot_weak_supervision_comparison,
)
from instseg_pipeline.settings import CONFIG_LOADER_ARGS

CONF = Path(__file__).resolve().parents[2] / "conf"
CATEGORIES = make_categories([
    {"category_id": 1, "name": "disc", "supercategory": "shape", "isthing": True},
    {"category_id": 2, "name": "dot", "supercategory": "shape", "isthing": True}])
# per image: (height, width, [(category, cx, cy, r), ...]); radii 12 (small, area < 32^2),
# 30 (medium) and 64 (large, area > 96^2)
DISCS = [(96, 128, [(1, 30, 30, 12), (2, 90, 50, 30)]),
         (160, 160, [(1, 80, 80, 64)]),
         (96, 96, [(2, 48, 48, 30), (1, 15, 78, 12)])]
NO_WORKERS = {"workers": 0}  # the tests stay in this process


def _scene(root: Path, image_id: int, height: int, width: int, discs: list,
           rng: np.random.Generator) -> tuple[dict, list[np.ndarray]]:
    """A dark noisy image with bright discs, written as PNG; (images row, disc masks)."""
    pixels = rng.integers(0, 40, (height, width, 3)).astype(np.uint8)
    masks = []
    for index, (_, cx, cy, r) in enumerate(discs):
        mask = circle(height, width, cx, cy, r)
        pixels[mask.astype(bool)] = (230, 200 - 60 * index, 40 + 80 * index)
        masks.append(mask)
    name = f"{image_id:03d}.png"
    Image.fromarray(pixels).save(root / name)
    return {"image_id": image_id, "file_name": name, "width": width, "height": height,
            "split": "train" if image_id % 4 else "val", "source": "test"}, masks


def _tables(root: Path, scenes: list) -> tuple[pd.DataFrame, pd.DataFrame]:
    """images and instances of ``scenes`` (one instance per disc, ids from 1)."""
    rng = np.random.default_rng(0)
    images, rows = [], []
    for image_id, (height, width, discs) in enumerate(scenes, start=1):
        image, masks = _scene(root, image_id, height, width, discs, rng)
        images.append(image)
        for (category, *_), mask in zip(discs, masks):
            rows.append(instance_row(len(rows) + 1, image_id, category, mask))
    return make_images(images), make_instances(rows)


@pytest.fixture()
def discs(tmp_path):
    images, instances = _tables(tmp_path, DISCS)
    # a crowd region and a row already holding a pseudo-mask: neither is measured
    crowd = instance_row(90, 1, 1, circle(96, 128, 64, 80, 10), iscrowd=True)
    extra = make_instances([crowd, instance_row(91, 3, 1, circle(96, 96, 80, 15, 10))])
    instances = pd.concat([instances, extra], ignore_index=True)
    instances["mask_source"] = ["annotated"] * (len(instances) - 1) + ["grabcut"]
    return {"root": tmp_path, "images": images, "instances": instances}


def _quality(discs: dict, **block) -> dict:
    params = {"pseudo_masks": NO_WORKERS, **block}
    return measure_pseudo_mask_quality(discs["images"], discs["instances"], CATEGORIES,
                                       {"root": str(discs["root"])}, params)


def test_grabcut_beats_the_filled_box_on_high_contrast_discs(discs):
    report = _quality(discs)
    methods = report["methods"]
    assert list(methods) == ["box", "grabcut"]
    assert report["instances"] == 5 and report["images"] == 3
    box, grabcut = methods["box"], methods["grabcut"]
    # a filled box covers a disc with IoU pi/4 (minus rasterisation)
    assert box["mean_iou"] == pytest.approx(math.pi / 4, abs=0.06)
    assert grabcut["mean_iou"] > box["mean_iou"] + 0.1 and grabcut["mean_iou"] > 0.85
    for stats in methods.values():
        assert stats["n"] == 5 and sum(stats["sources"].values()) == 5
        assert {s: stats["by_size"][s]["n"] for s in mask_quality.SIZES} == {
            "small": 2, "medium": 2, "large": 1}
        assert {k: v["n"] for k, v in stats["by_category"].items()} == {"disc": 3, "dot": 2}
        assert 0.0 <= stats["median_iou"] <= 1.0
    assert box["sources"] == {"box": 5} and box["fallbacks"] == {}
    assert grabcut["sources"].get("grabcut", 0) + sum(grabcut["fallbacks"].values()) == 5
    json.dumps(report, allow_nan=False)  # the catalog's JSON: no NaN anywhere
    figure = plot_pseudo_mask_quality(report)
    assert len(figure.axes[0].patches) == 2 * 4  # methods x (all + 3 sizes)


def test_the_sample_is_capped_seeded_and_its_buckets_stay_present(discs):
    first = _quality(discs, methods=["box"], max_instances=2, seed=3)
    again = _quality(discs, methods=["box"], max_instances=2, seed=3)
    assert first == again and first["instances"] == 2
    stats = first["methods"]["box"]
    assert stats["n"] == 2 and set(stats["by_size"]) == set(mask_quality.SIZES)
    assert sum(b["n"] for b in stats["by_size"].values()) == 2
    empty = [b for b in stats["by_size"].values() if b["n"] == 0]
    assert empty and all(b["mean_iou"] is None for b in empty)


def test_a_fallback_is_counted_by_reason(tmp_path):
    """A disc fills pi/4 of its box: under min_fill 0.9, GrabCut's disc falls back to the
    filled box."""
    images, instances = _tables(tmp_path, [(128, 128, [(1, 64, 64, 50)])])
    report = measure_pseudo_mask_quality(
        images, instances, CATEGORIES, {"root": str(tmp_path)},
        {"methods": ["grabcut"], "pseudo_masks": {**NO_WORKERS, "min_fill": 0.9}})
    stats = report["methods"]["grabcut"]
    assert stats["n"] == 1 and stats["sources"] == {"box": 1}
    assert stats["fallbacks"] == {"too_small_in_box": 1}
    assert stats["mean_iou"] == pytest.approx(math.pi / 4, abs=0.03)


def test_quality_refuses_tables_without_annotated_masks(discs):
    instances = discs["instances"].assign(mask_source="box")
    with pytest.raises(ValueError, match=r"needs annotated .*\(mask_source counts: \{'box': 7\}"):
        _quality({**discs, "instances": instances})


# ----------------------------------------------------------------------- the comparison
# 10 train images (so that 90 % of them is a whole number) and 3 val images
SHAPES = [(96, 96, [(1 + i % 2, 30 + i, 34, 14), (2 - i % 2, 66, 62 - i, 18)])
          for i in range(13)]
TRAINING = {"max_iters": 3, "batch_size": 2, "warmup_iters": 1, "threads": 1,
            "device": "cpu", "log_every": 0, "checkpoint_every": 0, "progress_bar": False,
            "preview_samples": 0, "model": {"name": "maskrcnn_tiny", "min_size": 96,
                                            "max_size": 96}}


def _split(images: pd.DataFrame) -> pd.DataFrame:
    return images.assign(split=["val" if i > 10 else "train" for i in images["image_id"]])


@pytest.mark.slow
def test_four_variants_at_one_budget(tmp_path):
    images, instances = _tables(tmp_path, SHAPES)
    images = _split(images)
    training = {**TRAINING, "checkpoint_dir": str(tmp_path / "ckpt")}
    rows = compare_weak_supervision(
        images, instances, CATEGORIES, make_instances([]), {"root": str(tmp_path)},
        training, {"batch_size": 2, "device": "cpu"},
        {"pseudo_masks": NO_WORKERS, "budget": {"max_iters": 3}})
    assert [r["variant"] for r in rows] == ["full", "box", "grabcut", "mixed"]
    assert [r["method"] for r in rows] == ["annotated", "box", "grabcut", "grabcut"]
    assert [r["pseudo_share"] for r in rows[:3]] == [0.0, 1.0, 1.0]
    assert [r["pseudo_image_share"] for r in rows] == pytest.approx([0.0, 1.0, 1.0, 0.9])
    assert 0.8 <= rows[3]["pseudo_share"] <= 1.0
    for row in rows:
        assert row["iterations"] == 3 and row["train_seconds"] > 0
        for key in ("mAP", "mAP_50", "mAP_75", "box_mAP"):
            assert row[key] is not None and 0.0 <= row[key] <= 1.0, (row["variant"], key)
    assert rows[0]["mAP_vs_full"] in (None, 1.0)
    json.dumps(rows, allow_nan=False)
    for variant in ("full", "box", "grabcut", "mixed"):  # a checkpoint folder each
        assert (tmp_path / "ckpt" / "weak_supervision" / variant).is_dir()
    figure = plot_weak_supervision_comparison(rows)
    assert len(figure.axes[0].patches) == 4 * 4  # metrics x variants


def test_variants_replace_only_train_masks(tmp_path):
    images, instances = _tables(tmp_path, SHAPES)
    images = _split(images)
    config = WeakSupervisionConfig.from_params({"pseudo_masks": NO_WORKERS})
    val = images.loc[images["split"] == "val", "image_id"]
    for variant, share in (("full", 0.0), ("box", 1.0)):
        table = weak.variant_instances(variant, images, instances, tmp_path, config)
        assert weak.pseudo_shares(images, table) == (share, share)
        kept = table[table["image_id"].isin(val)]
        assert (kept["rle"].to_numpy() == instances.loc[kept.index, "rle"].to_numpy()).all()
        assert (mask_quality.mask_sources(kept) == "annotated").all()
    weak.check_annotated(instances)
    with pytest.raises(ValueError, match=r"20 instances carry pseudo-masks \(box 20; "
                                         r"annotation ids 1, 2, 3, 4, 5, \.\.\.\)"):
        weak.check_annotated(weak.variant_instances("box", images, instances, tmp_path,
                                                    config))


def test_the_budget_is_shared_and_milestones_keep_their_fraction():
    training = {**TRAINING, "max_iters": 600, "checkpoint_dir": "ckpt", "resume": "auto",
                "scheduler": {"name": "multistep", "milestones": [450, 550]}}
    params = weak.variant_training_params(training, "box", BudgetConfig(max_iters=60), 0.5)
    assert params["max_iters"] == 60 and params["scheduler"]["milestones"] == [45, 55]
    assert params["time_budget_min"] is None and params["resume"] == "none"
    assert params["selection"]["every_epochs"] == 0 and params["val_max_images"] == 0
    assert params["checkpoint_dir"] == str(Path("ckpt") / "weak_supervision" / "box")
    assert params["pseudo_mask_loss_weight"] == 0.5
    timed = weak.variant_training_params(training, "full", BudgetConfig(time_budget_min=2.5))
    assert timed["max_iters"] == 600 and timed["time_budget_min"] == 2.5
    assert "pseudo_mask_loss_weight" not in timed


@pytest.mark.parametrize(("block", "message"), [
    ({"variants": ["full", "full"]}, r"^weak_supervision\.variants: 'full' is listed twice"),
    ({"variants": ["boxes"]}, r"^weak_supervision\.variants\[0\]: expected one of"),
    ({"mixed_full_fraction": 1.0}, r"^weak_supervision\.mixed_full_fraction: must be in"),
    ({"pseudo_masks": {"grabcut_iters": 3}},
     r"^weak_supervision\.pseudo_masks\.grabcut_iters: unknown key"),
    ({"pseudo_masks": {"method": "box"}}, r"^weak_supervision\.pseudo_masks\.method: set by"),
    ({"methods": ["sam"]},
     r"^weak_supervision\.pseudo_masks\.sam_checkpoint: required with method 'sam'"),
    ({"budget": {"max_iter": 3}}, r"^weak_supervision\.budget\.max_iter: unknown key"),
])
def test_a_bad_block_fails_by_its_dotted_name(block, message):
    with pytest.raises(ConfigError, match=message):
        WeakSupervisionConfig.from_params(block)


def test_sam_joins_the_default_methods_with_a_checkpoint():
    assert WeakSupervisionConfig().quality_methods() == ("box", "grabcut")
    config = WeakSupervisionConfig.from_params({"pseudo_masks": {"sam_checkpoint": "sam.pt"}})
    assert config.quality_methods() == ("box", "grabcut", "sam")


# ------------------------------------------------------------------ registration, catalog
def _conf(kind: str) -> dict:
    args = {k: v for k, v in CONFIG_LOADER_ARGS.items() if k != "default_run_env"}
    return OmegaConfigLoader(conf_source=str(CONF), env="local", **args)[kind]


def test_registered_alone_with_its_inputs_in_the_catalog():
    from kedro.framework.project import configure_project

    from instseg_pipeline.pipeline_registry import register_pipelines

    configure_project("instseg_pipeline")
    pipelines = register_pipelines()
    pipeline = pipelines["weak_supervision"]
    assert not {n.name for n in pipeline.nodes} & {n.name for n in pipelines["__default__"].nodes}
    catalog, parameters = _conf("catalog"), _conf("parameters")
    for name in pipeline.inputs():
        if name.startswith("params:"):
            assert name.removeprefix("params:") in parameters, name
        else:
            assert name in catalog, name
    assert pipeline.outputs() == {"pseudo_mask_quality_plot",
                                  "weak_supervision_comparison_plot"}
    for name in pipeline.all_outputs():  # every report is saved, versioned
        assert catalog[name]["versioned"] is True, name
    assert WeakSupervisionConfig.from_params(parameters["weak_supervision"]) == \
        WeakSupervisionConfig()


def test_mask_ious_of_known_shapes():
    a = np.zeros((2, 4, 4), bool)
    b = np.zeros((2, 4, 4), bool)
    a[0, :2], b[0, :, :2] = True, True          # 4 shared pixels of 12
    b[1, 0, 0] = True                           # nothing shared
    assert mask_quality.mask_ious(a, b).tolist() == pytest.approx([4 / 12, 0.0])
    assert mask_quality.mask_ious(a[1:], a[1:]).tolist() == [0.0]   # both empty


@pytest.fixture()
def tracking_uri(tmp_path):
    """MLflow pointed at a store in tmp_path for the test, then back where it was."""
    import mlflow
    from mlflow.tracking import fluent

    before, experiment = mlflow.get_tracking_uri(), fluent._active_experiment_id
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    # an experiment of this store: the one an earlier test made active is in another store
    mlflow.set_experiment("weak_supervision_test")
    yield uri
    mlflow.set_tracking_uri(before)
    fluent._active_experiment_id = experiment


@pytest.mark.slow
def test_each_variant_gets_a_nested_mlflow_run(tmp_path, tracking_uri):
    import mlflow
    from mlflow.tracking import MlflowClient

    images, instances = _tables(tmp_path, SHAPES)
    images = _split(images)
    training = {**TRAINING, "max_iters": 1, "checkpoint_dir": str(tmp_path / "ckpt")}
    with mlflow.start_run(run_name="pipeline") as parent:
        rows = compare_weak_supervision(
            images, instances, CATEGORIES, make_instances([]), {"root": str(tmp_path)},
            training, {"batch_size": 2, "device": "cpu"},
            {"variants": ["box"], "pseudo_masks": NO_WORKERS})
        _quality(_discs_in(tmp_path / "discs"), methods=["box"])
    client = MlflowClient(tracking_uri)
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert [run.info.run_name for run in children] == ["box"]
    child = children[0].data
    assert child.params["variant"] == "box" and child.params["max_iters"] == "1"
    assert child.metrics["pseudo_share"] == 1.0 == rows[0]["pseudo_share"]
    assert child.metrics["iterations"] == 1 and "train/loss" in child.metrics
    top = client.get_run(parent.info.run_id).data.metrics
    assert top["pseudo_iou/box"] == pytest.approx(math.pi / 4, abs=0.06)
    assert "pseudo_iou/box/small" in top and "pseudo_iou/box/large" in top
    assert {"weak_supervision_comparison.md", "weak_supervision_comparison.json"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)}


def _discs_in(root: Path) -> dict:
    root.mkdir()
    images, instances = _tables(root, DISCS)
    return {"root": root, "images": images, "instances": instances}
