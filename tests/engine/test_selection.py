"""Model selection keeps the weights of the best evaluation, not the last."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch
from PIL import Image

from instseg_pipeline.data.masks import bitmap_to_rle, rle_to_string
from instseg_pipeline.data.tables import make_categories, make_images, make_instances
from instseg_pipeline.engine import selection
from instseg_pipeline.models import build_model


def _tables(root):
    Image.new("RGB", (64, 48), (90, 90, 90)).save(root / "a.png")
    mask = np.zeros((48, 64), dtype=np.uint8)
    mask[10:30, 10:40] = 1
    images = make_images([{"image_id": 1, "file_name": "a.png", "width": 64, "height": 48,
                           "split": "val", "source": "test"}])
    instances = make_instances([{"instance_id": 1, "image_id": 1, "category_id": 1,
                                 "bbox": [10, 10, 30, 20], "area": 600, "iscrowd": False,
                                 "rle": rle_to_string(bitmap_to_rle(mask))}])
    categories = make_categories([{"category_id": 1, "name": "box", "supercategory": "",
                                   "isthing": True}])
    return images, instances, categories


def test_selector_keeps_the_best_weights(tmp_path, monkeypatch):
    images, instances, categories = _tables(tmp_path)
    scores = iter([0.3, 0.5, 0.4])
    monkeypatch.setattr(selection, "coco_stats", lambda *a, **k: {"mAP": next(scores)})
    model = build_model({"name": "maskrcnn_tiny", "min_size": 48, "max_size": 64}, 2)
    selector = selection.BestModelSelector(images, instances, categories, str(tmp_path),
                                           every_epochs=2)
    snapshots, fired = [], []
    for epoch in range(6):
        with torch.no_grad():
            next(model.parameters()).add_(1.0)  # the weights change every epoch
        model.train()
        # what the loop passes at an epoch end: epochs done, steps done, the evaluated model
        selector.on_epoch_end(SimpleNamespace(epoch=epoch + 1, iteration=10 * (epoch + 1),
                                              eval_model=model,
                                              fire=lambda *event: fired.append(event)))
        snapshots.append(next(model.parameters()).detach().clone())
    assert [h["iteration"] for h in selector.history] == [20, 40, 60]  # every 2nd epoch
    assert fired == [("evaluation", {"segm_mAP": v}) for v in (0.3, 0.5, 0.4)]
    assert selector.best["iteration"] == 40 and selector.best["value"] == 0.5
    best_first_param = next(iter(selector.best_state.values()))
    assert torch.equal(best_first_param, snapshots[3])
    assert model.training, "evaluation must hand the model back in training mode"


def test_other_ranks_do_not_evaluate(tmp_path, monkeypatch):
    images, instances, categories = _tables(tmp_path)
    monkeypatch.setattr(selection, "coco_stats", lambda *a, **k: {"mAP": 1.0})
    monkeypatch.setattr(selection.distributed, "rank", lambda: 1)
    selector = selection.BestModelSelector(images, instances, categories, str(tmp_path), 1)
    selector.on_epoch_end(SimpleNamespace(epoch=1, iteration=5, eval_model=None))
    assert selector.history == [] and selector.best is None
    assert isinstance(pd.DataFrame(selector.history), pd.DataFrame)
