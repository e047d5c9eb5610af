"""`fit` with a semantic (panoptic) family: it builds the model with ``stuff_classes``, its
targets carry the ``semantic`` map, the model dict names the stuff classes, model selection
reads past the extra eval output; the training nodes pass the stuff segments along.

The family is a test-only one: maskrcnn_tiny's network, flagged semantic, that records the
targets it trains on and adds a ``semantic`` map to its eval output. It is registered in a
copy of the registry, so no other test sees it."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scene_shapes import instance_row, rect
from torch import nn

from instseg_pipeline.data.tables import (
    IGNORE_LABEL,
    make_categories,
    make_images,
    make_instances,
)
from instseg_pipeline.engine import distributed
from instseg_pipeline.engine import fit as fit_module
from instseg_pipeline.engine.config import TrainingConfig
from instseg_pipeline.models import load_model, registry
from instseg_pipeline.pipelines.training import nodes

NAME = "semantic_test_tiny"
W, H = 64, 48
BASE = "maskrcnn_tiny"


class SemanticRecorder(nn.Module):
    """maskrcnn_tiny with a record of the train targets it sees and a constant semantic
    eval output (all "things"), as a panoptic family would return it."""

    def __init__(self, inner: nn.Module, stuff_classes: int):
        super().__init__()
        self.inner = inner
        self.stuff_classes = stuff_classes
        self.seen: list[list[dict]] = []

    def forward(self, images, targets=None):
        if targets is not None:
            self.seen.append([{k: v for k, v in t.items()} for t in targets])
            return self.inner(images, targets)
        outputs = self.inner(images)
        for image, output in zip(images, outputs):
            output["semantic"] = torch.zeros(image.shape[-2:], dtype=torch.int64,
                                             device=image.device)
        return outputs


@pytest.fixture
def semantic_family(monkeypatch):
    """The registered test family; ``built`` lists (params, network) of every build."""
    monkeypatch.setattr(registry, "FAMILIES", dict(registry.FAMILIES))
    base = registry.family(BASE)
    built: list[tuple[dict, SemanticRecorder]] = []

    def without_stuff(params):
        return {k: v for k, v in params.items() if k != "stuff_classes"}

    def build(params, num_classes):
        network = SemanticRecorder(base.build(without_stuff(params), num_classes),
                                   int(params["stuff_classes"]))
        built.append((dict(params), network))
        return network

    def resolve(params):
        return {**base.resolve(without_stuff(params)),
                "stuff_classes": int(params["stuff_classes"])}

    entry = dataclasses.replace(base, name=NAME, build=build, resolve=resolve,
                                keys=(*base.keys, "stuff_classes"), semantic=True)
    registry.register(entry)
    return built


def _mask(y0, y1, x0, x1) -> np.ndarray:
    return rect(H, W, x0, y0, x1, y1)


@pytest.fixture
def tables(tmp_path):
    """Three images (two train, one val): sky on top, road below, a thing (category 5) on
    each and a crowd region on image 1. Stuff ids 30 (road) < 31 (sky): labels 1, 2."""
    rng = np.random.default_rng(0)
    rows = []
    for image_id in (1, 2, 3):
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(
            tmp_path / f"{image_id}.png")
        rows.append({"image_id": image_id, "file_name": f"{image_id}.png", "width": W,
                     "height": H, "split": "val" if image_id == 3 else "train",
                     "source": "handmade"})
    images = make_images(rows)
    instances = make_instances([instance_row(10 + i, i, 5, _mask(10, 34, 8 * i, 8 * i + 20))
                                for i in (1, 2, 3)]
                               + [instance_row(20, 1, 5, _mask(40, 46, 50, 60), iscrowd=True)])
    stuff = make_instances([instance_row(100 + 2 * i + k, i, cat, _mask(*rows_, 0, W))
                            for i in (1, 2, 3)
                            for k, (cat, rows_) in enumerate(((31, (0, 16)), (30, (30, 48))))])
    categories = make_categories([
        {"category_id": 5, "name": "box", "supercategory": "shape", "isthing": True},
        {"category_id": 31, "name": "sky", "supercategory": "sky", "isthing": False},
        {"category_id": 30, "name": "road", "supercategory": "ground", "isthing": False}])
    return images, instances, stuff, categories, tmp_path


def _training(tmp_path, name: str = NAME, **overrides) -> dict:
    return {"checkpoint_dir": str(tmp_path / "ckpt"), "max_iters": 3, "batch_size": 2,
            "warmup_iters": 1, "device": "cpu", "threads": 1, "log_every": 0,
            "checkpoint_every": 0, "progress_bar": False, "val_max_images": 1,
            "group_aspect_ratio": False, "log_model_to_mlflow": False,
            "augmentation": {"preset": "light"}, "scheduler": {"name": "constant"},
            "selection": {"every_epochs": 1, "max_images": 1},
            "model": {"name": name, "min_size": H, "max_size": W}, **overrides}


def _fit(tables, tmp_path, **overrides) -> dict:
    images, instances, stuff, categories, root = tables
    threads = torch.get_num_threads()
    try:
        return fit_module.fit(images, instances, categories, str(root),
                              TrainingConfig.from_params(_training(tmp_path, **overrides)),
                              stuff_segments=stuff)
    finally:
        torch.set_num_threads(threads)


def test_semantic_family_trains_on_semantic_targets(semantic_family, tables, tmp_path):
    result = _fit(tables, tmp_path)
    (params, network), = semantic_family
    assert params["stuff_classes"] == 2 and network.stuff_classes == 2
    targets = [t for batch in network.seen for t in batch]
    # 3 steps of 2 train images, plus the validation loss on the val image
    assert len(targets) >= 6
    for target in targets:
        semantic = target["semantic"]
        assert semantic.dtype == torch.int64 and semantic.shape == target["masks"].shape[-2:]
        assert set(torch.unique(semantic).tolist()) <= {0, 1, 2, IGNORE_LABEL}
        # sky, road and things are all there (a flip or a 0.75..1.25 zoom keeps each)
        assert {0, 1, 2} <= set(torch.unique(semantic).tolist())
    assert {t["image_id"] for t in targets} == {1, 2, 3}

    model = result["model"]
    assert model["stuff_category_ids"] == {1: 30, 2: 31}
    assert model["stuff_classes"] == {1: "road", 2: "sky"}
    assert model["classes"] == {1: "box"} and model["category_ids"] == {1: 5}
    assert model["config"]["name"] == NAME and model["config"]["stuff_classes"] == 2
    # selection evaluated segm AP on the instance outputs, past the extra "semantic" key
    assert model["selection"]["metric"] == "segm/mAP" and model["selection"]["history"]
    assert 0.0 <= model["selection"]["value"] <= 1.0
    rebuilt = load_model(model["config"], model["state_dict"])
    assert isinstance(rebuilt, SemanticRecorder) and rebuilt.stuff_classes == 2


def test_stuff_classes_follow_the_data_not_the_parameters(semantic_family, tables, tmp_path,
                                                           caplog):
    images, instances, stuff, categories, root = tables
    config = TrainingConfig.from_params(_training(
        tmp_path, max_iters=1, selection={"every_epochs": 0},
        model={"name": NAME, "min_size": H, "max_size": W, "stuff_classes": 7}))
    with caplog.at_level("WARNING", logger="instseg_pipeline.engine.fit"):
        result = fit_module.fit(images, instances, categories, str(root), config,
                                stuff_segments=stuff)
    assert result["model"]["config"]["stuff_classes"] == 2
    assert "training.model.stuff_classes=7 replaced by the 2 stuff categories" in caplog.text


def test_instance_family_ignores_stuff_segments(tables, tmp_path):
    result = _fit(tables, tmp_path, name=BASE, max_iters=1, selection={"every_epochs": 0})
    model = result["model"]
    assert "stuff_classes" not in model and "stuff_category_ids" not in model
    assert "stuff_classes" not in model["config"]


def test_semantic_family_without_stuff_categories_is_refused(semantic_family, tables,
                                                             tmp_path):
    images, instances, _, categories, root = tables
    things = categories[categories["isthing"]]
    config = TrainingConfig.from_params(_training(tmp_path))
    with pytest.raises(ValueError, match=rf"^{NAME} needs stuff categories \(isthing false\); "
                                         r"source handmade has none$"):
        fit_module.fit(images, instances, things, str(root), config)
    assert semantic_family == [], "refused before any model was built"


def test_ddp_workers_get_the_stuff_segments(semantic_family, tables, tmp_path, monkeypatch):
    images, instances, stuff, categories, root = tables
    calls = []

    def fake_launch(fn, nproc_per_node, *args, **kwargs):
        calls.append((fn, args))
        return {"launched": True}

    monkeypatch.setattr(distributed, "launch", fake_launch)
    config = TrainingConfig.from_params(_training(
        tmp_path, distributed={"nproc_per_node": 2, "rdzv_backend": "static"}))
    assert fit_module.fit(images, instances, categories, str(root), config,
                          stuff_segments=stuff) == {"launched": True}
    (fn, args), = calls
    assert fn is fit_module._fit_here
    # the worker function is called with the launcher's arguments as they are
    assert any(arg is stuff for arg in args)
    monkeypatch.setattr(fit_module, "_train_here", lambda *a: {"stuff_segments": a[-1]})
    assert fn(*args)["stuff_segments"] is stuff


def test_build_datasets_and_preview_node(semantic_family, tables, tmp_path):
    images, instances, stuff, categories, root = tables
    config = TrainingConfig.from_params(_training(tmp_path))
    train, val = fit_module.build_datasets(images, instances, categories, root, config,
                                           stuff)
    assert train.semantic and val.semantic and train.augmentation is not None
    assert "semantic" in train[0][1] and "semantic" in val[0][1]
    plain, _ = fit_module.build_datasets(images, instances, categories, root,
                                         TrainingConfig.from_params(_training(tmp_path,
                                                                              name=BASE)),
                                         stuff)
    assert not plain.semantic and "semantic" not in plain[0][1]
    figure = nodes.preview_augmentation(images, instances, categories, stuff,
                                        {"type": "synthetic", "root": str(root)},
                                        {**_training(tmp_path), "preview_samples": 2})
    assert len(figure.axes) >= 2


def test_train_model_node_passes_the_stuff_segments(semantic_family, tables, tmp_path):
    images, instances, stuff, categories, root = tables
    threads = torch.get_num_threads()
    try:
        model, history, _ = nodes.train_model(
            images, instances, categories, stuff, {"type": "synthetic", "root": str(root)},
            _training(tmp_path, max_iters=1, selection={"every_epochs": 0}))
    finally:
        torch.set_num_threads(threads)
    assert model["stuff_classes"] == {1: "road", 2: "sky"} and len(history) == 1
    empty = pd.DataFrame(columns=stuff.columns)
    with pytest.raises(ValueError, match="needs stuff categories"):
        nodes.train_model(images, instances, categories[categories["isthing"]], empty,
                          {"type": "synthetic", "root": str(root)}, _training(tmp_path))
