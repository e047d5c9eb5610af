"""Training from the canonical tables: datasets, loaders, model and engine wired together.

Kedro-free: the training nodes call `fit`. With ``distributed.nproc_per_node > 1`` the
same function runs in that many workers through the elastic launcher (torchrun semantics);
rank 0's result comes back.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader, Subset

from instseg_pipeline import engine
from instseg_pipeline.engine import distributed
from instseg_pipeline.engine.selection import BestModelSelector
from instseg_pipeline.models import build_model, model_config
from instseg_pipeline.torchdata.augment import build_augmentation
from instseg_pipeline.torchdata.dataset import (
    InstanceDataset,
    MultiScale,
    aspect_ratio_group_ids,
    build_train_loader,
    collate,
)

logger = logging.getLogger(__name__)

_RDZV_KEYS = ("nnodes", "node_rank", "rdzv_endpoint", "rdzv_backend", "run_id",
              "max_restarts")


def engine_config(params: dict) -> dict:
    """The engine's part of the ``training`` parameters (the rest configures data/model)."""
    return {key: params[key] for key in engine.DEFAULT_CONFIG if key in params}


def build_datasets(images: pd.DataFrame, instances: pd.DataFrame, categories: pd.DataFrame,
                   root: str | Path, params: dict) -> tuple[InstanceDataset, InstanceDataset]:
    """Train split (augmented) and val split (plain) datasets."""
    seed = int(params.get("seed", 0))
    train = InstanceDataset(images, instances, categories, root, split="train",
                            augmentation=build_augmentation(params.get("augmentation")),
                            seed=seed)
    val = InstanceDataset(images, instances, categories, root, split="val", seed=seed)
    if len(train) == 0:
        raise ValueError("the train split has no images: check the ingestion split "
                         "(ingestion.val_fraction) or the source's split folders")
    return train, val


def _val_loader(val: InstanceDataset, params: dict) -> DataLoader | None:
    limit = params.get("val_max_images")
    subset = val if not limit or len(val) <= limit else Subset(val, range(int(limit)))
    if len(subset) == 0:
        return None
    return DataLoader(subset, batch_size=int(params.get("batch_size", 2)), collate_fn=collate)


def _fit_here(images: pd.DataFrame, instances: pd.DataFrame, categories: pd.DataFrame,
              root: str, params: dict) -> dict:
    torch.set_num_threads(int(params.get("threads") or torch.get_num_threads()))
    train, val = build_datasets(images, instances, categories, root, params)
    num_classes = len(categories) + 1
    model = build_model(params.get("model"), num_classes)
    config = model_config(params.get("model"), num_classes)
    groups = aspect_ratio_group_ids(train.images) if params.get("group_aspect_ratio", True) \
        else None

    def make_loader(epoch: int) -> DataLoader:
        return build_train_loader(train, int(params.get("batch_size", 2)),
                                  int(params.get("num_workers", 0)), int(params.get("seed", 0)),
                                  epoch, distributed.is_distributed(), groups)

    sizes = params.get("multiscale") or []
    selector = _selector(val, instances, categories, root, params)
    result = engine.train(model, make_loader, engine_config(params),
                          checkpoint_dir=params["checkpoint_dir"],
                          resume=params.get("resume", "none"), model_config=config,
                          multiscale=MultiScale(sizes, int(params.get("seed", 0)))
                          if sizes else None,
                          val_loader=_val_loader(val, params),
                          callbacks=(selector,) if selector else ())
    state, selection = _chosen_weights(model, result, selector)
    return {"model": {"config": config, "state_dict": state,
                      "classes": {int(k): v for k, v in train.label_names.items()},
                      "category_ids": {label: int(cat) for cat, label in train.mapping.items()},
                      "iterations": int(result.iterations), "selection": selection},
            "history": result.history, "val_history": result.val_history,
            "skipped_steps": int(result.skipped_steps)}


def _selector(val: InstanceDataset, instances: pd.DataFrame, categories: pd.DataFrame,
              root: str, params: dict) -> BestModelSelector | None:
    options = params.get("selection") or {}
    if not options.get("every_epochs") or len(val) == 0 or not distributed.is_main_process():
        return None
    subset = val.images.head(int(options.get("max_images") or len(val.images)))
    return BestModelSelector(subset, instances, categories, root, options["every_epochs"],
                             iou_type=options.get("iou_type", "segm"),
                             batch_size=int(params.get("batch_size", 2)))


def _chosen_weights(model, result, selector) -> tuple[dict, dict]:
    """The best evaluated weights (the final ones are evaluated too), or the last ones."""
    if selector is None:
        return result.state_dict, {"metric": None, "iteration": int(result.iterations)}
    if not selector.history or selector.history[-1]["iteration"] != result.iterations:
        selector.consider(engine.unwrap(model), int(result.iterations), None)
    logger.info("model selection: best %s %.4f at iteration %d", selector.best["metric"],
                selector.best["value"], selector.best["iteration"])
    return selector.best_state, {**selector.best, "history": selector.history}


def fit(images: pd.DataFrame, instances: pd.DataFrame, categories: pd.DataFrame,
        root: str | Path, params: dict) -> dict:
    """Train a model; returns ``{"model": {config, state_dict, classes, iterations},
    "history": DataFrame, "val_history": DataFrame, "skipped_steps": int}``."""
    dist_params = params.get("distributed") or {}
    nproc = int(dist_params.get("nproc_per_node", 1))
    args = (images, instances, categories, str(root), params)
    if nproc <= 1:
        return _fit_here(*args)
    logger.info("training in %d worker processes per node", nproc)
    return distributed.launch(_fit_here, nproc, *args,
                              **{k: dist_params[k] for k in _RDZV_KEYS if k in dist_params})
