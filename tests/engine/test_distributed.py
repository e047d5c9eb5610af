"""DDP through `launch`: two gloo workers on CPU give the gradients of one process on the
same global batch; rank helpers in a single process."""
from __future__ import annotations

import torch
from process_fixtures import free_port
from torch import nn

from instseg_pipeline.engine import distributed
from instseg_pipeline.engine.config import TrainingConfig
from instseg_pipeline.engine.loop import train

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
