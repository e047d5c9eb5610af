"""Training engine: schedules, clipping, loss weights, non-finite losses, checkpoints, resume,
validation, multiscale and a tiny Mask R-CNN trained on CPU."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from instseg_pipeline.config_schema import ConfigError
from instseg_pipeline.engine import checkpoint
from instseg_pipeline.engine.checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    latest_checkpoint,
    list_checkpoints,
    save_checkpoint,
)
from instseg_pipeline.engine.config import MASK_RCNN_LOSSES, TrainingConfig
from instseg_pipeline.engine.loop import NonFiniteLossError, train
from instseg_pipeline.engine.losses import validation_loss

TESTS_DIR = Path(__file__).resolve().parent
TINY_CONFIG = {"architecture": "tiny_regressor", "num_classes": 1}
BASE = {"device": "cpu", "progress_bar": False, "warmup_iters": 0, "log_every": 0,
        "checkpoint_every": 0, "scheduler": {"name": "constant"},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4}}


def config(checkpoint_dir, resume="none", **overrides) -> TrainingConfig:
    """BASE + ``overrides`` as the training node builds them (schema defaults elsewhere)."""
    return TrainingConfig.from_params({**BASE, **overrides, "checkpoint_dir": str(checkpoint_dir),
                                       "resume": str(resume)})


# ------------------------------------------------------------------------------ fixtures

class TinyRegressor(nn.Module):
    """Predicts a scalar per image (float [3, 4, 4]) with dropout, so RNG state matters.

    Returns {'loss_classifier': mean squared error over images, 'loss_mask': mean |pred|}:
    two components, each a mean over the images of the batch.
    """

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(0), nn.Linear(48, 16), nn.ReLU(), nn.Dropout(0.3),
                                 nn.Linear(16, 1))
        self.scale = scale

    def forward(self, images, targets):
        preds = torch.cat([self.net(img * self.scale) for img in images])
        goal = torch.stack([t["value"] for t in targets])
        return {"loss_classifier": ((preds - goal) ** 2).mean(), "loss_mask": preds.abs().mean()}


class Batches:
    """What make_loader(epoch) returns: fixed batches, shuffled by a per-epoch generator."""

    def __init__(self, items, batch_size: int, epoch: int):
        torch.rand(1)  # as a DataLoader draws its base seed from the global RNG on creation
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(100 + epoch))
        ordered = [items[i] for i in order.tolist()]
        self.batches = [ordered[i:i + batch_size] for i in range(0, len(items), batch_size)]

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            yield [img for img, _ in batch], [tgt for _, tgt in batch]


def make_items(n: int = 10, nan_ids=()) -> list:
    """n (image float [3, 4, 4], target {'value', 'image_id'}) pairs; NaN value at nan_ids."""
    gen = torch.Generator().manual_seed(7)
    items = []
    for i in range(n):
        value = torch.tensor(float("nan") if i in nan_ids else float(i % 3))
        items.append((torch.rand(3, 4, 4, generator=gen), {"value": value,
                                                           "image_id": torch.tensor(i)}))
    return items


def loader_factory(items, batch_size: int = 2):
    return lambda epoch: Batches(items, batch_size, epoch)


def tiny_model(scale: float = 1.0) -> TinyRegressor:
    torch.manual_seed(0)
    return TinyRegressor(scale)


def run(tmp_path, overrides, items=None, model=None, resume="none", **kwargs):
    items = make_items() if items is None else items
    return train(model or tiny_model(), loader_factory(items),
                 config(tmp_path / "ckpt", resume, **overrides), model_config=TINY_CONFIG,
                 **kwargs)


# ------------------------------------------------------------------------------ schedules

def test_warmup_rises_linearly_from_factor_times_lr(tmp_path):
    cfg = {"max_iters": 8, "warmup_iters": 4, "warmup_factor": 0.1,
           "optimizer": {"name": "sgd", "lr": 1e-3}}
    lrs = run(tmp_path, cfg).history["lr"].tolist()
    expected = [1e-3 * (0.1 + (1 - 0.1) * i / 4) for i in range(4)] + [1e-3] * 4
    assert lrs == pytest.approx(expected, rel=1e-9)


def test_multistep_schedule_divides_at_milestones(tmp_path):
    cfg = {"max_iters": 9, "scheduler": {"name": "multistep", "milestones": [3, 6], "gamma": 0.5},
           "optimizer": {"name": "adamw", "lr": 1e-3}}
    lrs = run(tmp_path, cfg).history["lr"].tolist()
    assert lrs == pytest.approx([1e-3] * 3 + [5e-4] * 3 + [2.5e-4] * 3, rel=1e-9)


def test_cosine_schedule_follows_half_cosine(tmp_path):
    cfg = {"max_iters": 6, "scheduler": {"name": "cosine"}, "optimizer": {"lr": 1e-3}}
    lrs = run(tmp_path, cfg).history["lr"].tolist()
    assert lrs == pytest.approx([1e-3 * 0.5 * (1 + math.cos(math.pi * i / 6)) for i in range(6)])


def test_time_budget_stops_the_run_and_its_schedule_follows_the_clock(tmp_path):
    """"Train for N minutes": the run ends at the budget, far from max_iters, and the cosine
    falls with the elapsed share of the budget, not with the share of max_iters."""
    import time

    def slow(event, info):  # each step takes at least 40 ms
        if event == "step_end":
            time.sleep(0.04)

    cfg = {"max_iters": 100_000, "time_budget_min": 0.01, "scheduler": {"name": "cosine"},
           "optimizer": {"name": "sgd", "lr": 1e-3}}
    started = time.perf_counter()
    result = run(tmp_path, cfg, callbacks=[slow])
    took = time.perf_counter() - started
    lrs = result.history["lr"].tolist()
    assert 3 <= result.iterations < 100 and took >= 0.6
    assert lrs == sorted(lrs, reverse=True) and lrs[0] == pytest.approx(1e-3)
    # by the last step most of the 0.6 s had passed: far down the cosine, which a schedule
    # over 100 000 iterations would not have left
    assert lrs[-1] < 0.4e-3


def test_time_budget_maps_milestones_to_their_share_of_the_run():
    from instseg_pipeline.engine.loop import lr_factor

    cfg = TrainingConfig.from_params({**BASE, "checkpoint_dir": "unused", "max_iters": 600,
                                      "scheduler": {"name": "multistep",
                                                    "milestones": [450, 550], "gamma": 0.1}})
    assert [lr_factor(0, cfg, share) for share in (0.0, 0.74, 0.75, 0.95)] == \
        pytest.approx([1.0, 1.0, 0.1, 0.01])
    # without a budget the iteration decides, as before
    assert [lr_factor(it, cfg) for it in (449, 450, 550)] == pytest.approx([1.0, 0.1, 0.01])


@pytest.mark.parametrize("minutes", [0, -1.5])
def test_a_time_budget_must_be_positive(tmp_path, minutes):
    with pytest.raises(ConfigError, match="time_budget_min"):
        config(tmp_path, time_budget_min=minutes)


def test_unknown_config_key_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"^training\.max_iter: unknown key; known: amp, "):
        config(tmp_path, max_iter=3)
    with pytest.raises(ConfigError, match=r"^training\.scheduler\.name: expected one of"):
        config(tmp_path, scheduler={"name": "poly"})


# ------------------------------------------------------------- clipping and loss weights

def _grad_norms(store):
    def callback(event, info):
        if event == "step_end":
            grads = [p.grad for p in info["model"].parameters() if p.grad is not None]
            store.append(float(torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(g) for g in grads]))))
    return callback


@pytest.mark.parametrize("clip", [None, 0.5])
def test_gradient_clipping_bounds_total_norm(tmp_path, clip):
    norms = []
    cfg = {"max_iters": 3, "clip_grad_norm": clip, "optimizer": {"lr": 1e-9}}
    run(tmp_path, cfg, model=tiny_model(scale=1e4), callbacks=[_grad_norms(norms)])
    if clip is None:
        assert min(norms) > 100  # the model really has huge gradients
    else:
        assert max(norms) <= clip * (1 + 1e-5)


def test_loss_weights_change_the_loss_and_the_update(tmp_path):
    plain = run(tmp_path / "a", {"max_iters": 3})
    weighted = run(tmp_path / "b", {"max_iters": 3, "loss_weights": {"loss_mask": 0.0,
                                                                      "loss_classifier": 2.0}})
    first = weighted.history.iloc[0]
    assert first["loss"] == pytest.approx(2.0 * first["loss_classifier"])
    assert plain.history.iloc[0]["loss"] == pytest.approx(
        plain.history.iloc[0]["loss_classifier"] + plain.history.iloc[0]["loss_mask"])
    assert not torch.equal(plain.state_dict["net.1.weight"], weighted.state_dict["net.1.weight"])


# ------------------------------------------------------------------- non-finite losses

def test_nonfinite_loss_error_names_iteration_and_images(tmp_path):
    items = make_items(nan_ids={4})
    with pytest.raises(NonFiniteLossError) as info:
        run(tmp_path, {"max_iters": 10}, items=items)
    batches = Batches(items, 2, 0).batches
    bad = next(i for i, b in enumerate(batches) if any(int(t["image_id"]) == 4 for _, t in b))
    ids = [int(t["image_id"]) for _, t in batches[bad]]
    assert info.value.iteration == bad and info.value.image_ids == ids
    assert f"iteration {bad}" in str(info.value) and str(ids) in str(info.value)


def test_nonfinite_loss_skip_counts_and_continues(tmp_path):
    result = run(tmp_path, {"max_iters": 10, "on_nonfinite": "skip"},
                 items=make_items(nan_ids={4}))
    assert result.skipped_steps == 2 and result.iterations == 10  # once per epoch
    assert result.history["skipped"].sum() == 2
    assert all(torch.isfinite(v).all() for v in result.state_dict.values())


# ------------------------------------------------------------------------- checkpoints

def test_keeps_last_k_checkpoints_with_expected_content(tmp_path):
    result = run(tmp_path, {"max_iters": 10, "checkpoint_every": 2, "keep_checkpoints": 3})
    names = [p.name for p in list_checkpoints(tmp_path / "ckpt")]
    assert names == ["ckpt_00000006.pt", "ckpt_00000008.pt", "ckpt_00000010.pt"]
    assert result.last_checkpoint == tmp_path / "ckpt" / "ckpt_00000010.pt"
    state = torch.load(result.last_checkpoint, weights_only=True)
    assert (state["iteration"], state["epoch"], state["batch_in_epoch"]) == (10, 2, 0)
    assert state["model_config"] == TINY_CONFIG and len(state["history"]) == 10
    assert set(state["rng"][0]) >= {"python", "numpy", "torch"}


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    good = save_checkpoint({"a": torch.ones(3)}, tmp_path / "ckpt_00000001.pt")

    def torch_save_dies_halfway(obj, handle):
        handle.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", torch_save_dies_halfway)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"a": torch.zeros(3)}, tmp_path / "ckpt_00000002.pt")
    with pytest.raises(OSError, match="disk full"):  # overwriting keeps the old file intact
        save_checkpoint({"a": torch.zeros(3)}, good)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_00000001.pt"]
    assert torch.equal(torch.load(good, weights_only=True)["a"], torch.ones(3))


def test_stale_temp_file_is_ignored_and_removed(tmp_path):
    run(tmp_path, {"max_iters": 4, "checkpoint_every": 2})
    stale = tmp_path / "ckpt" / ".ckpt_00000009.pt.12345.tmp"
    stale.write_bytes(b"PK\x03\x04 truncated by a kill")
    assert latest_checkpoint(tmp_path / "ckpt").name == "ckpt_00000004.pt"
    result = run(tmp_path, {"max_iters": 6, "checkpoint_every": 2}, resume="auto")
    assert not stale.exists() and result.iterations == 6
    assert len(result.history) == 6 and result.history["iteration"].tolist() == list(range(6))


def test_resume_auto_without_checkpoint_starts_fresh(tmp_path, caplog):
    caplog.set_level("INFO", logger="instseg_pipeline.engine")
    result = run(tmp_path, {"max_iters": 2}, resume="auto")
    assert result.iterations == 2 and "starting fresh" in caplog.text


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_checkpoint_raises_naming_the_file(tmp_path, damage):
    path = run(tmp_path, {"max_iters": 2}).last_checkpoint
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a checkpoint")
    with pytest.raises(CheckpointError, match=path.name):
        run(tmp_path, {"max_iters": 4}, resume="auto")
    with pytest.raises(CheckpointError, match="does not exist"):
        run(tmp_path, {"max_iters": 4}, resume=tmp_path / "nope.pt")


def test_checkpoint_of_another_model_config_is_refused(tmp_path):
    path = run(tmp_path, {"max_iters": 2}).last_checkpoint
    with pytest.raises(CheckpointMismatchError, match=r"num_classes: checkpoint has 1"):
        train(tiny_model(), loader_factory(make_items()),
              config(tmp_path / "other", path, max_iters=4),
              model_config={**TINY_CONFIG, "num_classes": 5})
    with pytest.raises(CheckpointMismatchError, match="architecture"):
        train(tiny_model(), loader_factory(make_items()),
              config(tmp_path / "other", path, max_iters=4),
              model_config={**TINY_CONFIG, "architecture": "other"})


# ----------------------------------------------------------------- resume after SIGKILL

RESUME_CFG = {"max_iters": 12, "checkpoint_every": 3, "keep_checkpoints": 3,
              "warmup_iters": 4, "warmup_factor": 0.2, "seed": 3,
              "scheduler": {"name": "multistep", "milestones": [7], "gamma": 0.5}}


def run_in(checkpoint_dir, resume, callbacks, max_iters=12):
    return train(tiny_model(), loader_factory(make_items()),
                 config(checkpoint_dir, resume, **{**RESUME_CFG, "max_iters": max_iters}),
                 model_config=TINY_CONFIG, callbacks=callbacks)


def assert_same_training(resumed, reference):
    assert resumed.iterations == reference.iterations
    for name, value in reference.state_dict.items():
        assert torch.equal(value, resumed.state_dict[name]), name
    assert resumed.history["loss"].tolist() == reference.history["loss"].tolist()
    assert resumed.history["iteration"].tolist() == list(range(reference.iterations))


def child_train_and_die(checkpoint_dir: str, kill_after: int) -> None:
    """Subprocess body: train, and SIGKILL this process once `kill_after` steps are done."""
    torch.set_num_threads(1)

    def die(event, info):
        if event == "step_end" and info["iteration"] == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    run_in(Path(checkpoint_dir), "none", [die])


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    ckpt = tmp_path / "ckpt"
    code = (f"import sys; sys.path.insert(0, {str(TESTS_DIR)!r}); import test_engine; "
            f"test_engine.child_train_and_die({str(ckpt)!r}, 8)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120,
                          check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    # saved after 3, 5 (epoch end: 5 batches per epoch) and 6; killed after step 8
    assert [p.name for p in ckpt.iterdir()] and not list(ckpt.glob(".*"))
    assert latest_checkpoint(ckpt).name == "ckpt_00000006.pt"

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        resumed = run_in(ckpt, "auto", ())
        reference = run_in(tmp_path / "reference", "none", ())
    finally:
        torch.set_num_threads(threads)
    assert_same_training(resumed, reference)


@pytest.mark.parametrize("stop_at", [5, 8])  # at an epoch end (5 batches), inside an epoch
def test_extending_a_finished_run_matches_one_long_run(tmp_path, stop_at):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        short = run_in(tmp_path / "run", "none", (), max_iters=stop_at)
        extended = run_in(tmp_path / "run", "auto", ())
        reference = run_in(tmp_path / "reference", "none", ())
    finally:
        torch.set_num_threads(threads)
    assert short.last_checkpoint.name == f"ckpt_{stop_at:08d}.pt"
    assert_same_training(extended, reference)


# ----------------------------------------------------------- validation and Mask R-CNN

class TinyBackbone(nn.Sequential):
    """Two stride-2 convolutions with BatchNorm: float [B, 3, H, W] -> [B, 16, H/4, W/4]."""

    out_channels = 16

    def __init__(self):
        super().__init__(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU())


def tiny_maskrcnn(num_classes: int = 3) -> nn.Module:
    """A torchvision MaskRCNN over TinyBackbone with 16-channel heads (about 60k weights)."""
    # imported here: the SIGKILL subprocess imports this module and need not pay for it
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops import MultiScaleRoIAlign

    torch.manual_seed(0)
    return MaskRCNN(
        TinyBackbone(), min_size=64, max_size=64,
        rpn_anchor_generator=AnchorGenerator(((16, 32),), ((0.5, 1.0, 2.0),)),
        box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2), box_head=TwoMLPHead(16 * 7 * 7, 64),
        box_predictor=FastRCNNPredictor(64, num_classes),
        mask_roi_pool=MultiScaleRoIAlign(["0"], 14, 2), mask_head=MaskRCNNHeads(16, (16, 16), 1),
        mask_predictor=MaskRCNNPredictor(16, 16, num_classes),
        rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50, rpn_batch_size_per_image=64,
        box_batch_size_per_image=32)


def detection_items(n: int = 4) -> list:
    """n 64x64 images each with two filled rectangles (labels 1, 2) and their masks."""
    gen = torch.Generator().manual_seed(1)
    items = []
    for i in range(n):
        image = torch.rand(3, 64, 64, generator=gen) * 0.2
        boxes = torch.tensor([[4 + i, 6, 30 + i, 34], [34, 30 - i, 60, 58]], dtype=torch.float32)
        masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
        for k, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
            masks[k, y0:y1, x0:x1] = 1
            image[k, y0:y1, x0:x1] += 0.7
        items.append((image, {"boxes": boxes, "labels": torch.tensor([1, 2]), "masks": masks,
                              "image_id": torch.tensor(100 + i)}))
    return items


class TwoSizes:
    def choose(self, iteration: int) -> int:
        return 48 if iteration % 2 else 64


def test_tiny_maskrcnn_trains_on_cpu_with_validation_and_multiscale(tmp_path):
    items = detection_items()
    sizes = []
    result = train(
        tiny_maskrcnn(), loader_factory(items),
        config(tmp_path, max_iters=4, warmup_iters=2, optimizer={"lr": 0.01}, progress_bar=True),
        model_config={"architecture": "tiny_maskrcnn", "num_classes": 3},
        multiscale=TwoSizes(), val_loader=Batches(items[:2], 2, 0),
        callbacks=[lambda e, i: sizes.append(i["model"].transform.min_size) if e == "step_end"
                   else None])
    history = result.history
    assert set(MASK_RCNN_LOSSES) <= set(history.columns) and len(history) == 4
    assert history[["loss", *MASK_RCNN_LOSSES]].notna().all().all()
    assert all(math.isfinite(v) for v in history["loss"])
    assert sizes == [(64,), (48,), (64,), (48,)]
    assert result.val_history["epoch"].tolist() == [1, 2]  # 2 batches per epoch
    assert math.isfinite(result.val_history["loss_mask"].iloc[-1])


def test_validation_loss_leaves_batchnorm_statistics_alone():
    model = tiny_maskrcnn()
    bn = model.backbone[1]
    before = (bn.running_mean.clone(), bn.num_batches_tracked.clone())
    values = validation_loss(model, Batches(detection_items(2), 2, 0), torch.device("cpu"),
                             {"loss_mask": 0.0})
    assert torch.equal(bn.running_mean, before[0])
    assert torch.equal(bn.num_batches_tracked, before[1])
    assert "loss_mask" in values  # reported unweighted, left out of the weighted total
    parts = sum(values[k] for k in MASK_RCNN_LOSSES if k != "loss_mask")
    assert values["loss"] == pytest.approx(parts, rel=1e-5)
