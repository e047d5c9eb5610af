"""Live tracking of a training run: MLflow metrics while it runs (a real sqlite store), the
progress log line, and TensorBoard event files read back."""
from __future__ import annotations

import io
import logging
import pickle
import time

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from instseg_pipeline.engine.callbacks import Callback
from instseg_pipeline.engine.config import TrainingConfig
from instseg_pipeline.engine.loop import train
from instseg_pipeline.engine.tensorboard import TensorBoardLogger, tensorboard_logger
from instseg_pipeline.kedro_ext.tracking import LiveMetrics

pytestmark = pytest.mark.slow  # a real MLflow store (its schema takes ~20 s to create)

MAX_ITERS, EVERY, BATCHES, BATCH = 20, 5, 5, 2


class TinySegmenter(nn.Module):
    """Train mode: two losses of one weight. Eval mode (the models contract): one instance
    per image whose mask is where the red channel of the float [3, H, W] image is > 0.5."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, images, targets=None):
        if self.training:
            return {"loss_a": ((self.w - 1.0) ** 2).sum(), "loss_b": self.w.abs().sum()}
        return [{"boxes": torch.tensor([[0.0, 0.0, img.shape[2], img.shape[1]]]),
                 "labels": torch.ones(1, dtype=torch.int64), "scores": torch.ones(1),
                 "masks": (img[:1] > 0.5).float()[None]} for img in images]


def _batches(epoch: int) -> list:
    generator = torch.Generator().manual_seed(epoch)
    return [([torch.rand(3, 8, 8, generator=generator) for _ in range(BATCH)],
             [{"image_id": torch.tensor(b * BATCH + i)} for i in range(BATCH)])
            for b in range(BATCHES)]


class FakeSelection(Callback):
    """Fires an evaluation after every epoch, as model selection does."""

    def on_epoch_end(self, state):
        state.fire("evaluation", {"segm_mAP": state.epoch / 10})


def _config(tmp_path, **overrides) -> TrainingConfig:
    return TrainingConfig.from_params({
        "device": "cpu", "progress_bar": False, "warmup_iters": 0, "log_every": EVERY,
        "checkpoint_every": 0, "scheduler": {"name": "constant"}, "max_iters": MAX_ITERS,
        "optimizer": {"name": "sgd", "lr": 0.1}, "checkpoint_dir": str(tmp_path / "ckpt"),
        **overrides})


def _store(folder):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("live")
    return uri, client, client.create_run(experiment).info.run_id


class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _picture() -> np.ndarray:
    """uint8 [8, 8, 3]: red on the left half (the tiny model's mask), dark elsewhere."""
    pixels = np.zeros((8, 8, 3), np.uint8)
    pixels[:, :4, 0] = 255
    return pixels


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run with live MLflow logging, TensorBoard and a store probe at step 10."""
    tmp_path = tmp_path_factory.mktemp("live")
    uri, client, run_id = _store(tmp_path)
    live = LiveMetrics(run_id, uri, EVERY)
    board = TensorBoardLogger(tmp_path / "tb", every=10, images=[("7", _picture())])
    seen = {}

    def probe(event, info):
        if event == "step_end":
            time.sleep(0.005)  # steps of this toy model take microseconds
            if info["iteration"] == 12:  # sent from step 10 on, by the logger's thread
                deadline = time.monotonic() + 30
                while len(client.get_metric_history(run_id, "train/loss")) < 10 and (
                        time.monotonic() < deadline):
                    time.sleep(0.05)
                seen["train/loss"] = len(client.get_metric_history(run_id, "train/loss"))

    engine_logger, lines = logging.getLogger("instseg_pipeline.engine"), Lines()
    engine_logger.addHandler(lines)
    level, engine_logger.level = engine_logger.level, logging.INFO
    try:
        train(TinySegmenter(), _batches, _config(tmp_path), model_config={"name": "tiny"},
              val_loader=_batches(99), callbacks=[FakeSelection(), live, board, probe])
    finally:
        engine_logger.removeHandler(lines)
        engine_logger.setLevel(level)
    return client, run_id, live, seen, tmp_path / "tb", lines.lines


def test_metrics_reach_mlflow_while_training_runs(trained):
    client, run_id, live, seen, *_ = trained
    assert seen["train/loss"] == 10  # flushed at step 10, while training went on
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(MAX_ITERS))
    stamps = [m.timestamp for m in sorted(history, key=lambda m: m.step)]
    assert stamps == sorted(stamps) and stamps[-1] - stamps[0] >= 50  # spread over the run
    for name in ("train/lr", "train/loss_a", "train/loss_b"):
        assert len(client.get_metric_history(run_id, name)) == MAX_ITERS, name
    speed = client.get_metric_history(run_id, "train/images_per_s")
    assert sorted(m.step for m in speed) == [5, 10, 15, 20] and all(m.value > 0 for m in speed)
    assert len(client.get_metric_history(run_id, "train/iters_per_s")) == 4
    val = {m.step: m.value for m in client.get_metric_history(run_id, "val/segm_mAP")}
    assert val == {5: 0.1, 10: 0.2, 15: 0.3, 20: 0.4}
    assert sorted(m.step for m in client.get_metric_history(run_id, "val/loss")) == [5, 10, 15, 20]
    assert live.pending == [] and live.logged == sum(
        len(client.get_metric_history(run_id, key)) for key in client.get_run(run_id).data.metrics)


def test_live_metrics_pickle_without_their_client(trained):
    _, run_id, live, *_ = trained
    assert live._client is not None
    copy = pickle.loads(pickle.dumps(live))
    assert copy.run_id == run_id and copy._client is None and copy._queue is None


def test_progress_line_has_loss_lr_speed_and_eta(trained):
    lines = [line for line in trained[-1] if line.startswith("iter ")]
    assert len(lines) == MAX_ITERS // EVERY
    first = lines[0]
    assert first.startswith(f"iter 5/{MAX_ITERS} epoch 0 loss ") and "loss_a " in first
    assert " lr 0.1 " in first and " img/s " in first and " it/s ETA 0:00:" in first


def test_tensorboard_event_files_hold_scalars_and_images(trained):
    from tensorboard.backend.event_processing import event_accumulator as ea

    *_, log_dir, _ = trained
    events = ea.EventAccumulator(str(log_dir), size_guidance={ea.SCALARS: 0, ea.IMAGES: 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/loss_a", "train/lr", "train/time", "val/loss",
            "val/segm_mAP"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == list(range(MAX_ITERS))
    assert [e.step for e in events.Scalars("val/segm_mAP")] == [5, 10, 15, 20]
    assert tags["images"] == ["predictions/7"]
    drawn = events.Images("predictions/7")
    assert [e.step for e in drawn] == [10, 20]  # every 10 steps; the end is step 20
    image = np.asarray(Image.open(io.BytesIO(drawn[-1].encoded_image_string)).convert("RGB"))
    original = _picture()
    assert image.shape == original.shape
    assert (image[:, :4] != original[:, :4]).any() and (image[:, 4:] == original[:, 4:]).all()


def test_tensorboard_logger_from_the_tables(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(_picture()).save(tmp_path / name)
    images = pd.DataFrame({"image_id": [3, 1, 2], "file_name": ["a.png", "b.png", "c.png"],
                           "width": 8, "height": 8, "split": ["val", "val", "train"]})
    off = tensorboard_logger(_config(tmp_path), images, tmp_path)
    assert off is None
    board = tensorboard_logger(_config(tmp_path, tensorboard=True, tensorboard_images=5,
                                       tensorboard_every=7), images, tmp_path, "run-1")
    assert board.log_dir.as_posix() == "data/09_tracking/tensorboard/run-1"
    assert board.every == 7 and [name for name, _ in board.images] == ["1", "3"]
    assert board.images[0][1].shape == (8, 8, 3)
