"""DDP through `launch`: two gloo workers on CPU give the gradients of one process on the
same global batch (a toy regressor), and the weights of one process with the doubled batch
on the real model (maskrcnn_tiny); `fit` launches DDP whenever the world size is above 1;
failed workers are reported by rank, pid and signal; rank helpers in a single process."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
from process_fixtures import free_port
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from instseg_pipeline.config_schema import ConfigError
from instseg_pipeline.engine import distributed, fit
from instseg_pipeline.engine.config import TrainingConfig
from instseg_pipeline.engine.loop import train
from instseg_pipeline.models import build_model

GLOBAL_BATCH = 4
CONFIG = {"device": "cpu", "progress_bar": False, "warmup_iters": 0, "log_every": 0,
          "checkpoint_every": 0, "max_iters": 2, "seed": 0, "scheduler": {"name": "constant"},
          "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0}}
MODEL_CONFIG = {"architecture": "mean_regressor", "num_classes": 1}


class MeanRegressor(nn.Module):
    """No randomness; loss = mean over the batch's images of a per-image squared error.

    Because the loss is a mean over images and DDP averages gradients over ranks, two ranks
    with two images each reproduce the gradient of one process on all four images.
    """

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(0), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, images, targets):
        preds = torch.cat([self.net(img) for img in images])
        goal = torch.stack([t["value"] for t in targets])
        return {"loss_classifier": ((preds - goal) ** 2).mean()}


def items() -> list:
    """8 (image float [3, 2, 2], {'value', 'image_id'}) pairs: two global batches of 4."""
    gen = torch.Generator().manual_seed(5)
    return [(torch.rand(3, 2, 2, generator=gen), {"value": torch.tensor(float(i % 3)),
                                                  "image_id": torch.tensor(i)})
            for i in range(2 * GLOBAL_BATCH)]


class ShardLoader:
    """Global batch b is items[4b : 4b + 4]; this rank gets its contiguous slice of it."""

    def __init__(self, rank: int, world: int):
        per_rank = GLOBAL_BATCH // world
        data = items()
        starts = range(0, len(data), GLOBAL_BATCH)
        self.batches = [data[s + rank * per_rank: s + (rank + 1) * per_rank] for s in starts]

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            yield [img for img, _ in batch], [t for _, t in batch]


def train_and_collect(checkpoint_dir: str) -> dict:
    """Train MeanRegressor on this rank's shard; return gradients of every step and ranks'."""
    torch.set_num_threads(1)
    rank, world = distributed.rank(), distributed.world_size()
    grads: list[dict] = []

    def keep_grads(event, info):
        if event == "step_end":
            local = {n: p.grad.clone() for n, p in info["model"].named_parameters()}
            grads.append(distributed.all_gather_objects(local))  # collective: every rank

    config = TrainingConfig.from_params({**CONFIG, "checkpoint_dir": checkpoint_dir})
    result = train(MeanRegressor(), lambda epoch: ShardLoader(rank, world), config,
                   model_config=MODEL_CONFIG, callbacks=[keep_grads])
    return {"rank": rank, "world": world, "grads": grads, "state": result.state_dict,
            "checkpoint": result.last_checkpoint}


def test_two_gloo_workers_match_one_process(tmp_path):
    single = train_and_collect(str(tmp_path / "single"))
    ddp = distributed.launch(train_and_collect, 2, str(tmp_path / "ddp"),
                             rdzv_endpoint=f"127.0.0.1:{free_port()}", run_id="test-ddp")
    assert (ddp["rank"], ddp["world"], single["world"]) == (0, 2, 1)
    assert len(ddp["grads"]) == len(single["grads"]) == 2
    for step_ddp, step_single in zip(ddp["grads"], single["grads"], strict=True):
        rank0, rank1 = step_ddp
        for name, expected in step_single[0].items():
            assert torch.equal(rank0[name], rank1[name]), name  # DDP synchronised them
            torch.testing.assert_close(rank0[name], expected, rtol=0, atol=1e-6)
    for name, expected in single["state"].items():
        torch.testing.assert_close(ddp["state"][name], expected, rtol=0, atol=1e-6)
    saved = torch.load(ddp["checkpoint"], weights_only=True)
    assert len(saved["rng"]) == 2 and saved["iteration"] == 2  # rank 0 wrote both ranks' RNG


def test_helpers_outside_a_process_group():
    assert not distributed.is_distributed()
    assert (distributed.rank(), distributed.world_size()) == (0, 1)
    assert distributed.is_main_process()
    assert distributed.all_gather_objects({"a": 1}) == [{"a": 1}]
    assert distributed.all_true(False, torch.device("cpu")) is False
    values = torch.tensor([1.0, 2.0])
    assert torch.equal(distributed.all_reduce_sum(values), torch.tensor([1.0, 2.0]))


def test_static_backend_gets_node_rank():
    config = distributed._launch_config(2, 2, 1, "10.0.0.1:29500", "static", "job", 0, {},
                                        "spawn")
    assert config.rdzv_configs["rank"] == 1 and (config.min_nodes, config.max_nodes) == (2, 2)
    c10d = distributed._launch_config(2, 1, 0, "127.0.0.1:1", "c10d", "job", 0, {}, "spawn")
    assert "rank" not in c10d.rdzv_configs  # c10d assigns node ranks at rendezvous


# ------------------------------------------------------------ fit: when DDP is launched

@pytest.mark.parametrize(("nnodes", "nproc", "launched"),
                         [(1, 1, False), (2, 1, True), (1, 2, True), (2, 2, True)])
def test_fit_launches_ddp_whenever_the_world_size_is_above_one(monkeypatch, tmp_path, nnodes,
                                                             nproc, launched):
    """One process per node on two nodes is DDP too (it used to train alone on each node)."""
    calls = []
    monkeypatch.setattr(fit, "_fit_here", lambda *args: {"here": True})

    def fake_launch(fn, nproc_per_node, *args, **kwargs):
        calls.append((fn, nproc_per_node, kwargs))
        return {"launched": True}

    monkeypatch.setattr(distributed, "launch", fake_launch)
    config = TrainingConfig.from_params({
        "checkpoint_dir": str(tmp_path),
        "distributed": {"nnodes": nnodes, "nproc_per_node": nproc, "node_rank": nnodes - 1,
                        "rdzv_backend": "static", "timeout_s": 60}})
    empty = pd.DataFrame()
    result = fit.fit(empty, empty, empty, tmp_path, config)
    assert result == ({"launched": True} if launched else {"here": True})
    if launched:
        (fn, nproc_per_node, kwargs), = calls
        assert fn is fit._fit_here and nproc_per_node == nproc
        assert (kwargs["nnodes"], kwargs["node_rank"], kwargs["timeout_s"]) == (
            nnodes, nnodes - 1, 60)


def test_a_failed_worker_is_reported_with_a_resume_hint(monkeypatch, tmp_path):
    (tmp_path / "ckpt_00000002.pt").write_bytes(b"")

    def killed(*args, **kwargs):
        failures = [{"rank": 1, "local_rank": 1, "pid": 4242, "exitcode": -9,
                     "signal": "SIGKILL", "message": None}]
        raise distributed.WorkerFailedError("distributed training failed (...)", failures)

    monkeypatch.setattr(distributed, "launch", killed)
    config = TrainingConfig.from_params({"checkpoint_dir": str(tmp_path),
                                         "distributed": {"nproc_per_node": 2}})
    empty = pd.DataFrame()
    with pytest.raises(distributed.WorkerFailedError,
                       match=r"Newest checkpoint: .*ckpt_00000002\.pt; rerun with "
                             r"training\.resume=auto") as caught:
        fit.fit(empty, empty, empty, tmp_path, config)
    assert caught.value.failures[0]["pid"] == 4242


@pytest.mark.parametrize(("block", "message"), [
    ({"nnodes": 2, "node_rank": 2}, r"^training\.distributed\.node_rank: must be in 0\.\.1"),
    ({"nproc_per_node": 0}, r"^training\.distributed\.nproc_per_node: must be >= 1"),
    ({"timeout_s": 0}, r"^training\.distributed\.timeout_s: must be > 0"),
])
def test_distributed_block_is_checked_by_its_dotted_name(tmp_path, block, message):
    with pytest.raises(ConfigError, match=message):
        TrainingConfig.from_params({"checkpoint_dir": str(tmp_path), "distributed": block})


def test_child_failures_name_rank_pid_and_signal(tmp_path):
    killed = ProcessFailure(local_rank=1, pid=4242, exitcode=-9,
                            error_file=str(tmp_path / "none.json"))
    error = ChildFailedError("train", {3: killed})
    failures = distributed.describe_failures(error)
    assert failures == [{"rank": 3, "local_rank": 1, "pid": 4242, "exitcode": -9,
                         "signal": "SIGKILL", "message": None}]
    text = distributed._failure_message(failures, 2, 2)
    assert "rank 3 (local rank 1, pid 4242) was killed by SIGKILL" in text
    assert text.startswith("distributed training failed (2 node(s) x 2 worker(s))")


# ----------------------------------------- the real model: 2 workers = 1 process, batch x2
#
# What makes DDP and the doubled batch differ for Mask R-CNN, and how this test removes it:
# - DDP averages the ranks' gradients, i.e. the mean over ranks of each rank's loss. Mask
#   R-CNN's losses are means over what the batch sampled (anchors for the RPN, proposals for
#   the box head, positive proposals x pixels for the mask head), pooled over the batch's
#   images: a per-rank mean equals the pooled mean only when every image contributes the
#   same number of items. Images here share one geometry (size and instance boxes), so the
#   anchors' labels and counts agree; ``rpn_post_nms_top_n_train: 0`` makes the ROI heads
#   train on the ground-truth boxes only (torchvision adds them to the proposals), so every
#   image has the same positives. With proposals on, the number of positive proposals per
#   image depends on the image content and the two runs differ (numbers in the report).
# - The RPN and ROI samplers draw with torch.randperm from the global RNG, which is seeded
#   per rank: sampling budgets above the candidate counts take every candidate, so the
#   draws do not matter.
# - Augmentation draws per rank: none here (the tensors are given).
# - GroupNorm normalises per image (maskrcnn_tiny has no BatchNorm), so batch composition
#   does not leak between images; equal image sizes mean no padding differences.
# What remains is float summation order (one batch of 4 vs 2 + 2 and an all-reduce).

EQUAL_BATCH_PER_RANK = 2
EQUAL_STEPS = 3
EQUAL_MODEL = {"name": "maskrcnn_tiny", "min_size": 64, "max_size": 64,
               "rpn_batch_size_per_image": 100000, "rpn_post_nms_top_n_train": 0,
               "box_batch_size_per_image": 512}
EQUAL_CONFIG = {"device": "cpu", "progress_bar": False, "warmup_iters": 0, "log_every": 0,
                "checkpoint_every": 0, "seed": 0, "scheduler": {"name": "constant"},
                "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9,
                              "weight_decay": 0.0001}}


def equal_geometry_items(count: int) -> list:
    """``count`` (image float [3, 64, 64], target) pairs with the same two instance boxes
    and masks but their own colours, texture and labels (1 or 2)."""
    gen = torch.Generator().manual_seed(11)
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, 10:34, 8:30] = 1
    masks[1, 30:56, 36:58] = 1
    masks[1, 30:40, 36:44] = 0  # not a box: the mask head has a shape to learn
    boxes = torch.tensor([[8.0, 10.0, 30.0, 34.0], [36.0, 30.0, 58.0, 56.0]])
    items = []
    for index in range(count):
        image = torch.rand(3, 1, 1, generator=gen) * 0.4 + torch.rand(3, 64, 64,
                                                                     generator=gen) * 0.2
        for mask in masks.bool():
            image[:, mask] = torch.rand(3, 1, generator=gen) * 0.5 + 0.5
        labels = torch.randint(1, 3, (2,), generator=gen)
        items.append((image, {"boxes": boxes.clone(), "labels": labels,
                              "masks": masks.clone(), "image_id": torch.tensor(index)}))
    return items


class ListLoader:
    """Fixed batches (no RNG): global batch b is items[b * G : (b + 1) * G]; this rank
    gets its contiguous slice of it, as DDP shards a global batch."""

    def __init__(self, items: list, global_batch: int, rank: int, world: int):
        per_rank = global_batch // world
        self.batches = [items[s + rank * per_rank: s + (rank + 1) * per_rank]
                        for s in range(0, len(items), global_batch)]

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            yield [img for img, _ in batch], [t for _, t in batch]


def train_maskrcnn_tiny(checkpoint_dir: str, model: dict = EQUAL_MODEL,
                        steps: int = EQUAL_STEPS) -> dict:
    """Train maskrcnn_tiny on the equal-geometry items, global batch 2 x EQUAL_BATCH_PER_RANK
    (all of it here in one process, or this rank's share under DDP); every rank's history
    comes back, with rank 0's initial and final weights."""
    torch.set_num_threads(1)
    rank, world = distributed.rank(), distributed.world_size()
    global_batch = 2 * EQUAL_BATCH_PER_RANK
    items = equal_geometry_items(global_batch * steps)
    torch.manual_seed(0)  # the same initial weights in both runs (DDP syncs rank 0's anyway)
    network = build_model(model, num_classes=3)
    initial = {k: v.detach().clone() for k, v in network.state_dict().items()}
    config = TrainingConfig.from_params({**EQUAL_CONFIG, "max_iters": steps, "model": model,
                                         "checkpoint_dir": checkpoint_dir})
    result = train(network, lambda epoch: ListLoader(items, global_batch, rank, world), config,
                   model_config={"name": "maskrcnn_tiny", "num_classes": 3})
    return {"world": world, "initial": initial, "state": result.state_dict,
            "histories": distributed.all_gather_objects(result.history)}


def weight_differences(a: dict, b: dict) -> dict:
    """Max absolute difference over every floating-point tensor of two state_dicts, and
    the largest weight magnitude (for scale)."""
    floats = [k for k, v in a.items() if v.is_floating_point()]
    return {"max_abs": max(float((a[k] - b[k]).abs().max()) for k in floats),
            "max_weight": max(float(a[k].abs().max()) for k in floats)}


@pytest.mark.slow
def test_two_workers_match_one_process_with_the_doubled_batch_on_maskrcnn_tiny(tmp_path):
    single = train_maskrcnn_tiny(str(tmp_path / "single"))
    ddp = distributed.launch(train_maskrcnn_tiny, 2, str(tmp_path / "ddp"),
                             rdzv_endpoint=f"127.0.0.1:{free_port()}", run_id="test-equal")
    assert (single["world"], ddp["world"]) == (1, 2)
    for name, value in single["initial"].items():
        assert torch.equal(ddp["initial"][name], value), name  # same start
    # per step: the mean of the two ranks' losses is the loss of the whole batch
    (whole,), (rank0, rank1) = single["histories"], ddp["histories"]
    components = [c for c in whole.columns if c.startswith("loss")]
    assert len(whole) == len(rank0) == len(rank1) == EQUAL_STEPS and len(components) == 6
    pooled = (rank0[components] + rank1[components]) / 2
    assert not rank0[components].equals(rank1[components])  # the ranks saw other images
    pd.testing.assert_frame_equal(pooled, whole[components], rtol=1e-5, atol=1e-6)
    moved = weight_differences(single["state"], single["initial"])["max_abs"]
    gap = weight_differences(ddp["state"], single["state"])
    print(f"maskrcnn_tiny, {EQUAL_STEPS} SGD steps, 2 workers x {EQUAL_BATCH_PER_RANK} vs "
          f"1 x {2 * EQUAL_BATCH_PER_RANK}: max |w_ddp - w_single| = {gap['max_abs']:.3g}, "
          f"max |w_single - w_initial| = {moved:.3g}, max |w| = {gap['max_weight']:.3g}")
    assert moved > 1e-3  # training moved the weights far beyond the tolerance below
    assert gap["max_abs"] < 1e-5
