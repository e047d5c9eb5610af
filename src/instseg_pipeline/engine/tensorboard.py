"""TensorBoard event files of a training run (``training.tensorboard: true``).

`TensorBoardLogger` is a training `Callback` (rank 0 writes): every step's losses and lr
(``train/<name>``, step = the history row's iteration), validation losses and model
selection's AP (``val/<name>``, step = steps done), and every ``every`` steps and at the
end a few fixed val images with the model's predicted masks tinted over them
(``predictions/<image_id>``). `tensorboard_logger` builds one from the tables.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from instseg_pipeline.engine import distributed
from instseg_pipeline.engine.callbacks import Callback

if TYPE_CHECKING:
    from instseg_pipeline.engine.config import TrainingConfig
    from instseg_pipeline.engine.loop import TrainState

logger = logging.getLogger(__name__)

_NOT_SCALARS = ("iteration", "epoch", "skipped")  # history columns that are no curve


class TensorBoardLogger(Callback):
    """Writes the run's scalars and prediction images under ``log_dir``.

    images: ``(name, uint8 [H, W, 3])`` pairs, the val images drawn every ``every`` steps.
    score_threshold / mask_threshold: which predictions are drawn.
    """

    def __init__(self, log_dir: str | Path, every: int, images: list[tuple[str, np.ndarray]],
                 score_threshold: float = 0.5, mask_threshold: float = 0.5):
        self.log_dir, self.every, self.images = Path(log_dir), int(every or 0), images
        self.score_threshold, self.mask_threshold = score_threshold, mask_threshold
        self.writer = None
        self.drawn_at = -1

    def on_train_start(self, state: TrainState) -> None:
        if not distributed.is_main_process():
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.log_dir))
        logger.info("TensorBoard events in %s", self.log_dir)

    def on_step_end(self, state: TrainState, step: dict) -> None:
        if self.writer is None:
            return
        for name, value in step.items():
            if name not in _NOT_SCALARS:
                self.writer.add_scalar(f"train/{name}", float(value), step["iteration"])
        if self.every and state.iteration % self.every == 0:
            self.draw(state)

    def on_validation(self, state: TrainState, losses: dict[str, float]) -> None:
        self._scalars("val", losses, state.iteration)

    def on_evaluation(self, state: TrainState, metrics: dict[str, float]) -> None:
        self._scalars("val", metrics, state.iteration)

    def on_train_end(self, state: TrainState) -> None:
        if self.writer is None:
            return
        if self.drawn_at != state.iteration:
            self.draw(state)
        self.writer.close()
        self.writer = None

    def _scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"{prefix}/{name}", float(value), step)

    def draw(self, state: TrainState) -> None:
        """Predict the fixed images with the current weights; write them with masks tinted."""
        if not self.images:
            return
        start = time.perf_counter()
        model = state.eval_model
        was_training = model.training
        model.eval()
        try:
            for name, pixels in self.images:
                overlay = self._overlay(model, pixels, state.device)
                self.writer.add_image(f"predictions/{name}", overlay, state.iteration,
                                      dataformats="HWC")
        finally:
            model.train(was_training)
        self.drawn_at = state.iteration
        logger.debug("TensorBoard images at iteration %d in %.2f s", state.iteration,
                     time.perf_counter() - start)

    def _overlay(self, model, pixels: np.ndarray, device) -> np.ndarray:
        """float32 [H, W, 3] in [0, 1]: ``pixels`` uint8 [H, W, 3] with the predicted masks."""
        from instseg_pipeline.predict.backends import forward
        from instseg_pipeline.predict.postprocess import postprocess
        from instseg_pipeline.predict.preprocess import to_tensor
        from instseg_pipeline.viz.overlays import overlay_masks

        output = forward(model, [to_tensor(pixels)], device)[0]
        found = postprocess(output, self.score_threshold, self.mask_threshold)
        return overlay_masks(pixels.astype(np.float32) / 255.0, found.masks)


def fixed_images(images: pd.DataFrame, root: str | Path, count: int,
                 split: str = "val") -> list[tuple[str, np.ndarray]]:
    """The first ``count`` images of ``split`` (by image_id) as ``(image_id, uint8 [H, W,
    3])``; the train split when ``split`` has none."""
    from instseg_pipeline.data.images import load_image

    rows = images[images["split"] == split]
    if rows.empty:
        rows = images[images["split"] == "train"]
    rows = rows.sort_values("image_id").head(max(int(count), 0))
    return [(str(row.image_id), load_image(Path(root) / row.file_name,
                                           expected_size=(row.width, row.height))[0])
            for row in rows.itertuples(index=False)]


def tensorboard_logger(config: TrainingConfig, images: pd.DataFrame, root: str | Path,
                       run_name: str | None = None) -> TensorBoardLogger | None:
    """The run's `TensorBoardLogger` under ``tensorboard_dir/<run_name>`` (default: the
    local time, ``YYYYmmdd-HHMMSS``), or None when ``training.tensorboard`` is off."""
    if not config.tensorboard:
        return None
    name = run_name or time.strftime("%Y%m%d-%H%M%S")
    return TensorBoardLogger(Path(config.tensorboard_dir) / name, config.tensorboard_every,
                             fixed_images(images, root, config.tensorboard_images))
