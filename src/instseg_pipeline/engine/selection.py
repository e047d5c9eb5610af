"""Model selection during training: mask AP on a val subset every K epochs; the best
weights (not the last) become the trained model. With ``training.ema`` on, the weights
evaluated and kept are the moving average's (`TrainState.eval_model`)."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import pandas as pd
import torch

from instseg_pipeline.data.tables import label_mapping, thing_categories
from instseg_pipeline.engine import distributed
from instseg_pipeline.engine.callbacks import Callback
from instseg_pipeline.evaluation.coco import coco_stats
from instseg_pipeline.evaluation.ground_truth import coco_ground_truth
from instseg_pipeline.predict.batch import predict_images

if TYPE_CHECKING:
    from instseg_pipeline.engine.loop import TrainState

logger = logging.getLogger(__name__)


class BestModelSelector(Callback):
    """A training callback that evaluates after every ``every_epochs``-th epoch.

    ``images``: the val images evaluated (a subset keeps it cheap); the ground truth is built
    once from the tables. Only rank 0 evaluates. ``best_state`` holds a CPU copy of the best
    weights, ``history`` one row per evaluation.
    """

    def __init__(self, images: pd.DataFrame, instances: pd.DataFrame,
                 categories: pd.DataFrame, root: str, every_epochs: int,
                 iou_type: str = "segm", batch_size: int = 4):
        self.images, self.root, self.every = images, root, int(every_epochs)
        self.iou_type, self.batch_size = iou_type, batch_size
        # things only: a panoptic family's stuff is not an instance AP class, and its
        # eval output's "semantic" map is not read here
        # pseudo-masks among these val instances are scored, with a WARNING: selection only
        # ranks the checkpoints of one run; the evaluation nodes refuse them
        self.gt = coco_ground_truth(images, instances[instances["image_id"].isin(
            images["image_id"])], thing_categories(categories), allow_pseudo_masks=True,
            allowed_by="model selection ranks this run's checkpoints against them")
        self.to_category = {label: cat for cat, label in label_mapping(categories).items()}
        self.history: list[dict] = []
        self.best_state: dict | None = None
        self.best: dict | None = None

    def on_epoch_end(self, state: TrainState) -> None:
        if distributed.rank() != 0 or not self.every:
            return
        if state.epoch % self.every == 0:  # state.epoch counts the epochs done
            self._evaluate(state, state.epoch - 1)

    def on_train_end(self, state: TrainState) -> None:
        # the final weights are candidates too; evaluated here (not after `train`) so the
        # other callbacks see the result as an evaluation event while the run is live
        if distributed.rank() == 0 and self.every and (
                not self.history or self.history[-1]["iteration"] != state.iteration):
            self._evaluate(state, None)

    def _evaluate(self, state: TrainState, epoch: int | None) -> None:
        value = self.consider(state.eval_model, state.iteration, epoch)
        state.fire("evaluation", {f"{self.iou_type}_mAP": value})

    def consider(self, model: torch.nn.Module, iteration: int, epoch: int | None) -> float:
        """Evaluate ``model`` now; keep its weights if they are the best so far."""
        was_training = model.training
        device = next(model.parameters()).device
        predictions = predict_images(model, self.images, self.root, self.to_category,
                                     batch_size=self.batch_size, device=str(device))
        model.train(was_training)
        value = coco_stats(self.gt, predictions, iou_type=self.iou_type)["mAP"]
        self.history.append({"iteration": iteration, "epoch": epoch,
                             f"{self.iou_type}_mAP": value})
        logger.info("selection: %s mAP %.4f at iteration %d", self.iou_type, value, iteration)
        if self.best is None or value > self.best["value"]:
            self.best = {"iteration": iteration, "epoch": epoch, "value": value,
                         "metric": f"{self.iou_type}/mAP"}
            self.best_state = {k: v.detach().cpu().clone() for k, v in
                               model.state_dict().items()}
        return value
