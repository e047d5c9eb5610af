"""Training from the canonical tables: datasets, loaders, model and engine wired together.

Kedro-free: the training nodes call `fit`. When the world size (``distributed.nnodes x
distributed.nproc_per_node``) is above 1 the same function runs in DDP workers through the
elastic launcher (torchrun semantics), one process per node included; global rank 0's
result comes back on every node (`engine.distributed.launch`), so each node's caller saves
the same model.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader, Subset

from instseg_pipeline.config_schema import ConfigError
from instseg_pipeline.data.tables import stuff_mapping
from instseg_pipeline.engine import checkpoint, distributed
from instseg_pipeline.engine.config import TrainingConfig
from instseg_pipeline.engine.loop import TrainResult, train
from instseg_pipeline.engine.rng import reproducible, seed_everything
from instseg_pipeline.engine.selection import BestModelSelector
from instseg_pipeline.models import (
    DEFAULT_NAME,
    build_model,
    family,
    family_of,
    family_params,
    model_config,
)
from instseg_pipeline.predict.device import resolve_device
from instseg_pipeline.torchdata.augment import build_augmentation
from instseg_pipeline.torchdata.dataset import (
    InstanceDataset,
    MultiScale,
    aspect_ratio_group_ids,
    build_train_loader,
    collate,
)

logger = logging.getLogger(__name__)


def is_semantic(config: TrainingConfig) -> bool:
    """Whether ``training.model.name`` is a family with a semantic (stuff) head."""
    return family(config.model.get("name") or DEFAULT_NAME).semantic


def check_stuff_categories(categories: pd.DataFrame, images: pd.DataFrame,
                           config: TrainingConfig) -> dict[int, int]:
    """The `stuff_mapping` a semantic family trains on; ValueError naming the model and the
    source when ``categories`` has no stuff category."""
    mapping = stuff_mapping(categories)
    if not mapping:
        name = config.model.get("name") or DEFAULT_NAME
        sources = sorted({str(s) for s in images["source"]}) if "source" in images else []
        raise ValueError(f"{name} needs stuff categories (isthing false); source "
                         f"{', '.join(sources) or '(unknown)'} has none")
    return mapping


def build_datasets(images: pd.DataFrame, instances: pd.DataFrame, categories: pd.DataFrame,
                   root: str | Path, config: TrainingConfig,
                   stuff_segments: pd.DataFrame | None = None
                   ) -> tuple[InstanceDataset, InstanceDataset]:
    """Train split (augmented) and val split (plain) datasets.

    For a semantic family (`is_semantic`) their targets carry ``semantic`` maps built from
    the things and ``stuff_segments``; other families never read ``stuff_segments``.
    """
    semantic = is_semantic(config)
    if semantic:
        check_stuff_categories(categories, images, config)
        if stuff_segments is None or not len(stuff_segments):
            logger.warning("%s: no stuff segments; the semantic targets hold things and "
                           "void only", config.model.get("name") or DEFAULT_NAME)
    extra = {"stuff_segments": stuff_segments, "semantic": True} if semantic else {}
    train_set = InstanceDataset(images, instances, categories, root, split="train",
                                augmentation=build_augmentation(config.augmentation),
                                seed=config.seed,
                                pseudo_mask_weight=config.pseudo_mask_loss_weight, **extra)
    val_set = InstanceDataset(images, instances, categories, root, split="val",
                              seed=config.seed, **extra)
    if len(train_set) == 0:
        raise ValueError("the train split has no images: check the ingestion split "
                         "(ingestion.val_fraction) or the source's split folders")
    return train_set, val_set


def _val_loader(val: InstanceDataset, config: TrainingConfig) -> DataLoader | None:
    limit = config.val_max_images
    subset = val if not limit or len(val) <= limit else Subset(val, range(limit))
    if len(subset) == 0:
        return None
    return DataLoader(subset, batch_size=config.batch_size, collate_fn=collate)


def _fit_here(images: pd.DataFrame, instances: pd.DataFrame, categories: pd.DataFrame,
              root: str, config: TrainingConfig, callbacks: Sequence = (),
              stuff_segments: pd.DataFrame | None = None) -> dict:
    """This process's share of `fit`, in `engine.rng.reproducible` settings (a fixed thread
    count; deterministic kernels with ``training.deterministic``), restored afterwards."""
    device = resolve_device(config.device, "training.device")
    with reproducible(config.deterministic, config.threads, device.type):
        # the initial weights come from torch's global RNG: seed it before building the
        # model, or they depend on what this process happened to draw before
        seed_everything(config.seed)
        return _train_here(images, instances, categories, root, config, callbacks,
                           stuff_segments)


def _train_here(images: pd.DataFrame, instances: pd.DataFrame, categories: pd.DataFrame,
                root: str, config: TrainingConfig, callbacks: Sequence = (),
                stuff_segments: pd.DataFrame | None = None) -> dict:
    train_set, val_set = build_datasets(images, instances, categories, root, config,
                                        stuff_segments)
    num_classes = len(train_set.mapping) + 1  # the thing categories and the background
    params = family_params(config.model, config.families)
    if train_set.semantic:
        params = _with_stuff_classes(params, len(train_set.stuff_mapping))
    model = build_model(params, num_classes)
    check_loss_weights(config, model)
    identity = model_config(params, num_classes)
    groups = aspect_ratio_group_ids(train_set.images) if config.group_aspect_ratio else None

    def make_loader(epoch: int) -> DataLoader:
        return build_train_loader(train_set, config.batch_size, config.num_workers,
                                  config.seed, epoch, distributed.is_distributed(), groups)

    selector = _selector(val_set, instances, categories, root, config)
    result = train(model, make_loader, config, model_config=identity,
                   multiscale=MultiScale(config.multiscale, config.seed)
                   if config.multiscale else None,
                   val_loader=_val_loader(val_set, config),
                   callbacks=((selector,) if selector else ()) + tuple(callbacks))
    state, selection = _chosen_weights(model, result, selector)
    saved = {"config": identity, "state_dict": state,
             "classes": {int(k): v for k, v in train_set.label_names.items()},
             "category_ids": {label: int(cat) for cat, label in train_set.mapping.items()},
             "iterations": int(result.iterations), "selection": selection}
    if train_set.semantic:
        saved["stuff_category_ids"] = {int(k): int(cat)
                                       for cat, k in train_set.stuff_mapping.items()}
        saved["stuff_classes"] = {int(k): str(v) for k, v in train_set.stuff_names.items()}
    return {"model": saved, "history": result.history, "val_history": result.val_history,
            "skipped_steps": int(result.skipped_steps)}


def _with_stuff_classes(params: dict, count: int) -> dict:
    """``params`` with ``stuff_classes`` = the stuff categories of the data (a value in the
    parameters that differs is replaced, with a warning)."""
    given = params.get("stuff_classes")
    if given is not None and int(given) != count:
        logger.warning("training.model.stuff_classes=%s replaced by the %d stuff categories "
                       "of the data", given, count)
    return {**params, "stuff_classes": int(count)}


def check_loss_weights(config: TrainingConfig, model: torch.nn.Module) -> None:
    """Refuse a ``loss_weights`` key the model's family does not return: a misspelt loss
    would otherwise silently keep its weight of 1.0."""
    entry = family_of(model)
    unknown = [name for name in config.loss_weights if name not in entry.loss_names]
    if unknown:
        raise ConfigError(f"training.loss_weights.{unknown[0]}",
                          f"not a loss of {entry.name}; its losses: "
                          f"{', '.join(entry.loss_names)}")


def _selector(val: InstanceDataset, instances: pd.DataFrame, categories: pd.DataFrame,
              root: str, config: TrainingConfig) -> BestModelSelector | None:
    options = config.selection
    if not options.every_epochs or len(val) == 0 or not distributed.is_main_process():
        return None
    subset = val.images.head(options.max_images or len(val.images))
    return BestModelSelector(subset, instances, categories, root, options.every_epochs,
                             iou_type=options.iou_type, batch_size=config.batch_size)


def _chosen_weights(model: torch.nn.Module, result: TrainResult,
                    selector: BestModelSelector | None) -> tuple[dict, dict]:
    """The best evaluated weights (the final ones, ``result.state_dict``: the moving
    average's with ``training.ema``, are evaluated too), or the final ones."""
    if selector is None:
        return result.state_dict, {"metric": None, "iteration": int(result.iterations)}
    if not selector.history or selector.history[-1]["iteration"] != result.iterations:
        final = distributed.unwrap(model)
        final.load_state_dict(result.state_dict)
        selector.consider(final, int(result.iterations), None)
    logger.info("model selection: best %s %.4f at iteration %d", selector.best["metric"],
                selector.best["value"], selector.best["iteration"])
    return selector.best_state, {**selector.best, "history": selector.history}


def fit(images: pd.DataFrame, instances: pd.DataFrame, categories: pd.DataFrame,
        root: str | Path, config: TrainingConfig, callbacks: Sequence = (),
        stuff_segments: pd.DataFrame | None = None) -> dict:
    """Train a model; returns ``{"model": {config, state_dict, classes, category_ids,
    iterations, selection}, "history": DataFrame, "val_history": DataFrame,
    "skipped_steps": int}``.

    ``stuff_segments`` (the table of that name; None or empty for instance sources) is read
    by semantic families only: their model gets ``stuff_classes`` = the number of stuff
    categories, their targets ``semantic`` maps, and the model dict ``stuff_category_ids``
    and ``stuff_classes`` ({semantic label: category id / name}). A semantic family on
    categories without stuff is a ValueError.

    World size 1: in this process. Above 1: DDP workers on this node, and on every node the
    result of global rank 0 (the same dict on each). ``callbacks``: extra training callbacks
    (`engine.loop.train`), after model selection; picklable under DDP, where every worker
    gets a copy. Raises `distributed.WorkerFailedError`
    when a worker fails or is killed, saying how to resume.
    """
    launch = config.distributed
    args = (images, instances, categories, str(root), config, tuple(callbacks),
            stuff_segments)
    world = launch.nnodes * launch.nproc_per_node
    if is_semantic(config):  # here, not in each worker
        check_stuff_categories(categories, images, config)
    if world <= 1:
        return _fit_here(*args)
    logger.info("training with DDP: %d node(s) x %d worker(s) = world size %d (this node: "
                "node_rank %d, rendezvous %s via %s)", launch.nnodes, launch.nproc_per_node,
                world, launch.node_rank, launch.rdzv_endpoint, launch.rdzv_backend)
    try:
        return distributed.launch(_fit_here, launch.nproc_per_node, *args,
                                  nnodes=launch.nnodes, node_rank=launch.node_rank,
                                  rdzv_endpoint=launch.rdzv_endpoint,
                                  rdzv_backend=launch.rdzv_backend, run_id=launch.run_id,
                                  max_restarts=launch.max_restarts,
                                  timeout_s=launch.timeout_s)
    except distributed.WorkerFailedError as exc:
        # the same error with the way on; chained to the launcher's report, not to itself
        raise distributed.WorkerFailedError(f"{exc}. {_resume_hint(config)}",
                                            exc.failures) from exc.__cause__


def _resume_hint(config: TrainingConfig) -> str:
    """Where the run can continue from: the newest checkpoint rank 0 wrote (as this node
    sees ``checkpoint_dir``; other nodes need it on shared storage to resume)."""
    latest = checkpoint.latest_checkpoint(config.checkpoint_dir)
    if latest is None:
        return f"No checkpoint in {config.checkpoint_dir} yet: a rerun starts from scratch"
    return (f"Newest checkpoint: {latest}; rerun with training.resume=auto to continue "
            "from it")
