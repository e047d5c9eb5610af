"""``training.ema``: the moving average of the weights. Its ramped update against a hand
computation; it follows every optimizer step; `fit` returns and selects the average; a
resumed run continues the same average; off, checkpoints hold none."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from process_fixtures import free_port
from scene_shapes import instance_row, rect
from torch import nn

from instseg_pipeline.config_schema import ConfigError
from instseg_pipeline.data.tables import make_categories, make_images, make_instances
from instseg_pipeline.engine import distributed
from instseg_pipeline.engine.checkpoint import list_checkpoints, load_checkpoint
from instseg_pipeline.engine.config import TrainingConfig
from instseg_pipeline.engine.ema import ModelEMA
from instseg_pipeline.engine.fit import fit
from instseg_pipeline.engine.loop import train

W, H = 64, 48


# --------------------------------------------------------------------------- the update

class Scalars(nn.Module):
    """One weight, one frozen weight, a float buffer and an integer buffer."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0]))
        self.frozen = nn.Parameter(torch.tensor([0.1]), requires_grad=False)
        self.register_buffer("mean", torch.tensor([10.0]))
        self.register_buffer("count", torch.tensor(0, dtype=torch.int64))


def _set(model: Scalars, w: float, mean: float, count: int) -> None:
    with torch.no_grad():
        model.w.fill_(w)
        model.mean.fill_(mean)
        model.count.fill_(count)


def test_ramped_update_matches_a_hand_computation():
    model = Scalars()
    ema = ModelEMA(model, decay=0.9, warmup_iters=2)
    # d_t = 0.9 * (1 - exp(-t / 2))
    d1, d2 = 0.9 * (1 - math.exp(-0.5)), 0.9 * (1 - math.exp(-1.0))
    assert ema.decay_at(1) == pytest.approx(d1) and d1 == pytest.approx(0.354122, abs=1e-6)
    assert ema.decay_at(2) == pytest.approx(d2) and d2 == pytest.approx(0.568909, abs=1e-6)

    _set(model, w=3.0, mean=20.0, count=4)
    ema.update(model)
    w1, mean1 = d1 * 1.0 + (1 - d1) * 3.0, d1 * 10.0 + (1 - d1) * 20.0
    _set(model, w=-1.0, mean=0.0, count=9)
    ema.update(model)
    w2, mean2 = d2 * w1 + (1 - d2) * -1.0, d2 * mean1 + (1 - d2) * 0.0

    averaged = ema.module
    assert ema.updates == 2
    assert averaged.w.item() == pytest.approx(w2, rel=1e-6)  # 0.87271...
    assert w2 == pytest.approx(0.872710, abs=1e-5)
    assert averaged.mean.item() == pytest.approx(mean2, rel=1e-6)
    assert averaged.count.item() == 9  # integer buffers are copied, not averaged
    assert averaged.frozen.item() == model.frozen.item()  # equal entries stay bit-exact
    assert not averaged.w.requires_grad and not averaged.training
    assert model.w.item() == -1.0, "the live model is left alone"


def test_without_ramp_the_decay_is_constant_and_bad_settings_are_refused():
    model = Scalars()
    ema = ModelEMA(model, decay=0.75, warmup_iters=0)
    _set(model, w=5.0, mean=10.0, count=0)
    ema.update(model)
    assert ema.decay_at(1) == ema.decay_at(1000) == 0.75
    assert ema.module.w.item() == pytest.approx(0.75 * 1.0 + 0.25 * 5.0)
    with pytest.raises(ValueError, match=r"decay must be in \(0, 1\), got 1.0"):
        ModelEMA(model, decay=1.0)
    with pytest.raises(ValueError, match="warmup_iters must be >= 0, got -1"):
        ModelEMA(model, decay=0.9, warmup_iters=-1)


def test_state_dict_round_trip_continues_the_same_average():
    model = Scalars()
    first = ModelEMA(model, decay=0.9, warmup_iters=3)
    for w in (2.0, 4.0):
        _set(model, w=w, mean=w, count=int(w))
        first.update(model)
    second = ModelEMA(Scalars(), decay=0.9, warmup_iters=3)
    second.load_state_dict(first.state_dict())
    assert second.updates == 2
    _set(model, w=-3.0, mean=1.0, count=7)
    first.update(model)
    second.update(model)
    for name, value in first.module.state_dict().items():
        assert torch.equal(value, second.module.state_dict()[name]), name


def test_config_is_off_by_default_and_checked():
    config = TrainingConfig.from_params({"checkpoint_dir": "x"})
    assert config.ema.decay is None and config.ema.warmup_iters == 100
    on = TrainingConfig.from_params({"checkpoint_dir": "x", "ema": {"decay": 0.999}})
    assert on.ema.decay == 0.999
    with pytest.raises(ConfigError) as info:
        TrainingConfig.from_params({"checkpoint_dir": "x", "ema": {"decay": 1.5}})
    assert str(info.value) == "training.ema.decay: must be in [0, 1) or null, got 1.5"
    with pytest.raises(ConfigError, match=r"^training\.ema\.decy: unknown key; known: decay, "
                                          r"warmup_iters$"):
        TrainingConfig.from_params({"checkpoint_dir": "x", "ema": {"decy": 0.9}})


# ----------------------------------------------------------------------- in the loop

class Regressor(nn.Module):
    """A linear map of 4 numbers; train mode returns its squared error as a loss."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 1)

    def forward(self, images, targets):
        preds = torch.cat([self.linear(x) for x in images])
        return {"loss_regression": ((preds - torch.stack([t["value"] for t in targets]))
                                    ** 2).mean()}


def _batches(epoch: int) -> list:
    gen = torch.Generator().manual_seed(epoch)
    return [([torch.rand(4, generator=gen) for _ in range(2)],
             [{"value": torch.rand(1, generator=gen)[0]} for _ in range(2)])
            for _ in range(3)]


def _train(tmp_path, resume: str = "none", **overrides):
    params = {"device": "cpu", "progress_bar": False, "log_every": 0, "max_iters": 5,
              "warmup_iters": 0, "checkpoint_every": 1, "keep_checkpoints": 0,
              "scheduler": {"name": "constant"}, "optimizer": {"lr": 0.1},
              "checkpoint_dir": str(tmp_path / "ckpt"), "resume": resume, **overrides}
    return train(Regressor(), _batches, TrainingConfig.from_params(params),
                 model_config={"architecture": "regressor"})


def test_the_average_follows_every_step_and_starts_again_after_a_run_without_it(
        tmp_path, caplog):
    """A run without EMA saves no average; resumed with EMA on, the average starts from the
    checkpoint's weights and follows each later step's weights (one checkpoint a step)."""
    plain = _train(tmp_path, max_iters=2)
    assert plain.iterations == 2
    assert all("ema" not in load_checkpoint(p) for p in list_checkpoints(tmp_path / "ckpt"))
    with caplog.at_level("INFO", logger="instseg_pipeline.engine"):
        result = _train(tmp_path, resume="auto", ema={"decay": 0.8, "warmup_iters": 2})
    assert "holds no moving average of the weights" in caplog.text
    assert "EMA of the weights on: decay 0.8, ramp over 2 iterations" in caplog.text

    saved = [load_checkpoint(p) for p in list_checkpoints(tmp_path / "ckpt")]
    assert [s["iteration"] for s in saved] == [1, 2, 3, 4, 5]
    replay = Regressor()
    replay.load_state_dict(saved[1]["model"])
    ema = ModelEMA(replay, decay=0.8, warmup_iters=2)
    for step in saved[2:]:
        replay.load_state_dict(step["model"])
        ema.update(replay)
        assert step["ema"]["updates"] == ema.updates
        for name, value in ema.module.state_dict().items():
            assert torch.equal(step["ema"]["weights"][name], value), name
    # the result is the average, not the last trained weights
    for name, value in saved[-1]["ema"]["weights"].items():
        assert torch.equal(result.state_dict[name], value), name
    assert not torch.equal(result.state_dict["linear.weight"], saved[-1]["model"]["linear.weight"])


def train_sharded_with_ema(checkpoint_dir: str) -> dict:
    """DDP worker body (and the single-process reference): this rank's item of each batch
    of two; returns every rank's final weights (the average's)."""
    torch.set_num_threads(1)
    rank, world = distributed.rank(), distributed.world_size()

    def shard(epoch: int) -> list:
        return [([x for i, x in enumerate(images) if i % world == rank],
                 [t for i, t in enumerate(targets) if i % world == rank])
                for images, targets in _batches(epoch)]

    params = {"device": "cpu", "progress_bar": False, "log_every": 0, "max_iters": 4,
              "warmup_iters": 0, "checkpoint_every": 0, "scheduler": {"name": "constant"},
              "optimizer": {"lr": 0.1}, "checkpoint_dir": checkpoint_dir,
              "ema": {"decay": 0.8, "warmup_iters": 2}}
    result = train(Regressor(), shard, TrainingConfig.from_params(params),
                   model_config={"architecture": "regressor"})
    return {"world": world, "ranks": distributed.all_gather_objects(result.state_dict)}


def test_ddp_ranks_keep_the_same_average_as_one_process(tmp_path):
    single = train_sharded_with_ema(str(tmp_path / "single"))
    ddp = distributed.launch(train_sharded_with_ema, 2, str(tmp_path / "ddp"),
                             rdzv_endpoint=f"127.0.0.1:{free_port()}", run_id="test-ema")
    assert (single["world"], ddp["world"]) == (1, 2)
    rank0, rank1 = ddp["ranks"]
    for name, expected in single["ranks"][0].items():
        assert torch.equal(rank0[name], rank1[name]), name
        torch.testing.assert_close(rank0[name], expected, rtol=0, atol=1e-6)
    assert not torch.equal(single["ranks"][0]["linear.weight"], Regressor().linear.weight)


# ---------------------------------------------------------------- fit with Mask R-CNN

@pytest.fixture
def tables(tmp_path):
    """Five 64x48 images (four train, one val), each with one box (category 1)."""
    rng = np.random.default_rng(0)
    rows, instances = [], []
    for image_id in range(1, 6):
        x0 = 4 + 6 * image_id
        pixels = rng.integers(0, 60, (H, W, 3), dtype=np.uint8)
        pixels[8:40, x0:x0 + 24] += 150
        Image.fromarray(pixels).save(tmp_path / f"{image_id}.png")
        rows.append({"image_id": image_id, "file_name": f"{image_id}.png", "width": W,
                     "height": H, "split": "val" if image_id == 5 else "train",
                     "source": "handmade"})
        instances.append(instance_row(image_id, image_id, 1, rect(H, W, x0, 8, x0 + 24, 40)))
    categories = make_categories([{"category_id": 1, "name": "box", "supercategory": "shape",
                                   "isthing": True}])
    return make_images(rows), make_instances(instances), categories, tmp_path


def _fit(tables, folder: str, **overrides) -> dict:
    """maskrcnn_tiny, batch 1 (4 steps an epoch), a checkpoint every 3 steps and at each
    epoch end, all kept."""
    images, instances, categories, root = tables
    params = {"checkpoint_dir": str(root / folder), "max_iters": 6, "batch_size": 1,
              "warmup_iters": 2, "device": "cpu", "threads": 1, "log_every": 0,
              "checkpoint_every": 3, "keep_checkpoints": 0, "progress_bar": False,
              "val_max_images": 1, "group_aspect_ratio": False,
              "augmentation": {"preset": "light"}, "scheduler": {"name": "constant"},
              "optimizer": {"lr": 0.01}, "selection": {"every_epochs": 0},
              "model": {"name": "maskrcnn_tiny", "min_size": H, "max_size": W}, **overrides}
    threads = torch.get_num_threads()
    try:
        return fit(images, instances, categories, str(root),
                   TrainingConfig.from_params(params))
    finally:
        torch.set_num_threads(threads)


def _equal(first: dict, second: dict) -> bool:
    assert first.keys() == second.keys()
    return all(torch.equal(first[k], second[k]) for k in first)


EMA = {"decay": 0.9, "warmup_iters": 2}


def test_fit_returns_the_average_and_a_resumed_run_continues_it(tables):
    root = tables[-1]
    averaged = _fit(tables, "ema", ema=EMA)
    saved = {int(p.stem.split("_")[1]): load_checkpoint(p)
             for p in list_checkpoints(root / "ema")}
    assert sorted(saved) == [3, 4, 6]  # every 3 steps, and the end of the first epoch
    last = saved[6]
    assert last["ema"]["updates"] == 6
    weights = averaged["model"]["state_dict"]
    assert _equal(weights, last["ema"]["weights"]), "the model is the average"
    assert not _equal(weights, last["model"]), "... not the last trained weights"

    # the average leaves training alone: the same losses and trained weights without it,
    # whose checkpoints hold no average, and whose model is the trained weights
    plain = _fit(tables, "plain")
    assert plain["history"]["loss"].tolist() == averaged["history"]["loss"].tolist()
    assert all("ema" not in load_checkpoint(p) for p in list_checkpoints(root / "plain"))
    assert _equal(plain["model"]["state_dict"], last["model"])
    assert not _equal(plain["model"]["state_dict"], weights)

    # resumed inside the first epoch: the same average as the uninterrupted run
    resumed = _fit(tables, "resumed", ema=EMA, resume=str(root / "ema" / "ckpt_00000003.pt"))
    assert resumed["history"]["loss"].tolist() == averaged["history"]["loss"].tolist()
    assert _equal(resumed["model"]["state_dict"], weights)
    assert load_checkpoint(root / "resumed" / "ckpt_00000006.pt")["ema"]["updates"] == 6


def test_model_selection_evaluates_and_keeps_the_average(tables):
    root = tables[-1]
    result = _fit(tables, "selected", ema=EMA, max_iters=4,
                  selection={"every_epochs": 1, "max_images": 1})
    selection = result["model"]["selection"]
    assert [h["iteration"] for h in selection["history"]] == [4]
    saved = load_checkpoint(root / "selected" / "ckpt_00000004.pt")
    assert _equal(result["model"]["state_dict"], saved["ema"]["weights"])
    assert not _equal(result["model"]["state_dict"], saved["model"])
