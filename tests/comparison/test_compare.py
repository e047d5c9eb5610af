"""Kedro-free pieces of the model comparison: the per-model budget, the config schema, the
speed measurement (a torch-only family gets NaN ONNX speed and the reason), the table and
the figure."""
from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import pytest
import torch
from model_fixtures import one_thread  # noqa: F401  (autouse)
from torch_only_family import NOTE, TORCH_ONLY, torch_only_family  # noqa: F401

from instseg_pipeline.comparison import compare, speed
from instseg_pipeline.comparison.config import ModelComparisonConfig
from instseg_pipeline.comparison.plot import comparison_plot
from instseg_pipeline.config_schema import ConfigError
from instseg_pipeline.models import build_model

TRAINING = {"max_iters": 7, "batch_size": 2, "checkpoint_dir": "ckpt",
            "optimizer": {"name": "sgd", "lr": 0.02},
            "model": {"name": "maskrcnn_tiny", "min_size": 96, "max_size": 128}}


def test_training_params_swap_only_the_name_and_keep_the_budget():
    params = compare.training_params(TRAINING, "yolact_tiny",
                                     {"optimizer": {"lr": 0.001}, "model": {"width": 8}})
    assert params["model"] == {"name": "yolact_tiny", "min_size": 96, "max_size": 128,
                               "width": 8}
    assert params["optimizer"] == {"name": "sgd", "lr": 0.001}
    assert params["max_iters"] == 7 and params["batch_size"] == 2
    assert params["checkpoint_dir"] == "ckpt/model_comparison/yolact_tiny"
    assert TRAINING["model"]["name"] == "maskrcnn_tiny", "the shared dict was modified"


def test_an_override_cannot_rename_the_model():
    with pytest.raises(ConfigError, match=r"overrides\.a\.model\.name"):
        compare.training_params(TRAINING, "a", {"model": {"name": "b"}})


@pytest.mark.parametrize(("params", "message"), [
    ({"models": ["a", "a"]}, r"^model_comparison\.models: 'a' is listed twice"),
    ({"models": []}, r"^model_comparison\.models: name at least one"),
    ({"models": ["a"], "overrides": {"a": {"max_iters": 9}}},
     r"^model_comparison\.overrides\.a\.max_iters: shared by every compared model"),
    ({"speed": {"images": 0}}, r"^model_comparison\.speed\.images: must be >= 1"),
    ({"speeed": {}}, r"^model_comparison\.speeed: unknown key"),
])
def test_config_refuses_bad_blocks_by_dotted_name(params, message):
    with pytest.raises(ConfigError, match=message):
        ModelComparisonConfig.from_params(params)


def test_unknown_model_fails_before_training():
    with pytest.raises(ConfigError, match=r"model_comparison\.models\[1\]: unknown model "
                                          r"'nope_tiny'"):
        compare.check_models(["maskrcnn_tiny", "nope_tiny"])
    with pytest.raises(ConfigError, match=r"model_comparison\.overrides\.yolact_tinny: "
                                          r"unknown model 'yolact_tinny'"):
        compare.check_models({"yolact_tinny": {}}, where="overrides.{name}")


def test_overrides_of_models_not_compared_are_kept_for_later():
    config = ModelComparisonConfig.from_params({"models": ["maskrcnn_tiny"]})
    assert "yolact_tiny" in config.overrides and config.models == ("maskrcnn_tiny",)


@pytest.mark.parametrize(("name", "backbone"), [
    ("maskrcnn_tiny", "tiny"), ("yolact_plus_resnet50_fpn", "resnet50_fpn"),
    ("solov2_light_resnet50_fpn", "resnet50_fpn"),
    ("maskrcnn_mobilenet_v3_large_fpn", "mobilenet_v3_large_fpn"), ("odd", "odd")])
def test_backbone_from_the_name(name, backbone):
    assert compare.backbone_of(name) == backbone
    assert compare.backbone_of(name, {"backbone": "resnet101"}) == "resnet101"


def test_speed_rows_take_distinct_sizes_first():
    images = pd.DataFrame({"image_id": [5, 1, 2, 3, 4], "split": ["val"] * 4 + ["train"],
                           "height": [10, 10, 10, 20, 30], "width": [10, 10, 10, 20, 30]})
    assert compare.speed_rows(images, "val", 3)["image_id"].tolist() == [1, 3, 2]
    with pytest.raises(ValueError, match="no 'test' images"):
        compare.speed_rows(images, "test", 3)


def test_images_per_second_counts_timed_runs_only():
    calls = []
    fps = speed.images_per_second(calls.append, [np.zeros(1)] * 3, warmup=2, repeats=2)
    assert len(calls) == 2 + 3 * 2 and fps > 0


def _arrays(count: int = 2) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (96, 112 + 8 * i, 3), dtype=np.uint8) for i in range(count)]


@pytest.mark.usefixtures("torch_only_family")
def test_a_torch_only_family_gets_nan_onnx_speed_and_the_reason(caplog):
    torch.manual_seed(0)
    network = build_model({"name": TORCH_ONLY, "min_size": 96, "max_size": 128}, 3).eval()
    with caplog.at_level(logging.WARNING, logger="instseg_pipeline.comparison.speed"):
        result = speed.measure_speed(network, _arrays(), threads=1, warmup=1)
    assert result["fps"] > 0 and math.isnan(result["fps_onnx"])
    assert NOTE in result["onnx_note"] and TORCH_ONLY in result["onnx_note"]
    assert any(NOTE in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert result["params"] == sum(p.numel() for p in network.parameters())


@pytest.mark.slow
def test_an_exportable_family_is_timed_in_onnx_runtime():
    torch.manual_seed(0)  # random weights keep up to detections_per_img boxes: a trace example
    network = build_model({"name": "maskrcnn_tiny", "min_size": 96, "max_size": 128,
                           "box_detections_per_img": 5}, 3).eval()
    result = speed.measure_speed(network, _arrays(), threads=1, warmup=1)
    assert result["fps"] > 0 and result["fps_onnx"] > 0 and result["onnx_note"] == ""


def test_a_failing_export_is_a_reason_not_a_crash(monkeypatch):
    torch.manual_seed(0)
    network = build_model({"name": "maskrcnn_tiny", "min_size": 96, "max_size": 128,
                           "box_detections_per_img": 5}, 3).eval()

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported op Foo\nTorch IR graph at exception: graph(...)")

    monkeypatch.setattr("instseg_pipeline.export.onnx.export_onnx", broken)
    fps, reason = speed.onnx_fps(network, _arrays(1), threads=1)
    assert math.isnan(fps)
    assert reason == "ONNX export of maskrcnn_tiny failed: RuntimeError: unsupported op Foo"


def test_table_columns_and_plot():
    rows = [{"model": "a_tiny", "backbone": "tiny", "mAP": 0.5, "mAP_50": 0.7, "mAP_75": 0.4,
             "box_mAP": 0.45, "fps": 10.0, "fps_onnx": 14.0, "params": 1000,
             "train_seconds": 3.0, "onnx_note": ""},
            {"model": "b_tiny", "backbone": "tiny", "mAP": 0.3, "mAP_50": 0.6, "mAP_75": 0.2,
             "box_mAP": 0.25, "fps": 20.0, "fps_onnx": math.nan, "params": 2000,
             "train_seconds": 4.0, "onnx_note": "not exportable"}]
    table = compare.comparison_table(rows)
    assert list(table.columns) == compare.COLUMNS and table["params"].dtype == np.int64
    figure = comparison_plot(table)
    (ax,) = figure.axes
    assert sorted(t.get_text() for t in ax.texts) == ["a_tiny", "b_tiny"]
    assert len(ax.collections) == 3  # a: eager + ONNX, b: eager only
    assert ax.get_xscale() == "log"
