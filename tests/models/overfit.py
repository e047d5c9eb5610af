"""Overfitting a family on four synthetic images: the check that its losses, targets and
post-processing agree (a family that cannot memorise four images has a bug, not a budget).

`overfit_tables` writes four synthetic images (ingested through the synthetic source, every
image in the ``train`` split); `overfit` trains a model on them through the project's
engine (`engine.fit.fit`) and returns its COCO mask and box AP on the same four images
through the one inference path (`predict.batch.predict_images`) and the COCO evaluation.
`overfit_panoptic` does the same for a semantic family with the source's stuff (sky and
ground) and returns its PQ: instances and semantic maps combined by
`predict.panoptic.panoptic_outputs` (`combine_panoptic`), scored by
`evaluation.panoptic.pq_from_predictions` against things + stuff segments.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import torch

from instseg_pipeline.data.tables import label_mapping
from instseg_pipeline.engine.config import TrainingConfig
from instseg_pipeline.engine.fit import fit
from instseg_pipeline.evaluation.metrics import coco_metrics
from instseg_pipeline.models import load_model
from instseg_pipeline.pipelines.ingestion.nodes import ingest_source
from instseg_pipeline.pipelines.synthetic.nodes import generate_synthetic_data
from instseg_pipeline.predict.batch import predict_images

SYNTHETIC = {"seed": 3, "num_images": 4, "min_size": 96, "max_size": 128, "max_objects": 3,
             "empty_fraction": 0.0, "crowd_fraction": 0.0, "touching_fraction": 0.0}
# enough steps for a tiny family to memorise four images; families pass their own lr
ENGINE = {"batch_size": 2, "warmup_iters": 20, "warmup_factor": 0.1, "threads": 1,
          "augmentation": {"preset": "none"}, "group_aspect_ratio": False,
          "selection": {"every_epochs": 0}, "val_max_images": 0, "progress_bar": False,
          "log_every": 0, "checkpoint_every": 0, "log_model_to_mlflow": False,
          "scheduler": {"name": "cosine"}, "device": "cpu"}


def _ingested(root: Path) -> tuple[pd.DataFrame, ...]:
    """images (all ``train``), instances, categories, stuff_segments under root."""
    source = {"type": "synthetic", "root": str(root), "synthetic": dict(SYNTHETIC)}
    generate_synthetic_data(source)
    images, instances, categories, stuff_segments, _ = ingest_source(source)
    return images.assign(split="train"), instances, categories, stuff_segments


def overfit_tables(root: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """images (all ``train``), instances, categories of four synthetic images under root."""
    return _ingested(root)[:3]


def _train(tmp_path: Path, tables: tuple, model: Mapping, iters: int, lr: float,
           optimizer: str, engine: Mapping) -> dict:
    """`engine.fit.fit` on ``tables`` (images, instances, categories[, stuff_segments])."""
    config = TrainingConfig.from_params({
        **ENGINE, **engine, "checkpoint_dir": str(tmp_path / "ckpt"), "max_iters": iters,
        "model": dict(model),
        "optimizer": {"name": optimizer, "lr": lr, "weight_decay": 0.0001}})
    threads = torch.get_num_threads()
    try:
        return fit(*tables[:3], str(tmp_path / "overfit_data"), config,
                   stuff_segments=tables[3] if len(tables) > 3 else None)
    finally:
        torch.set_num_threads(threads)


def _predictions(network, images: pd.DataFrame, categories: pd.DataFrame, root: Path):
    to_category = {label: cat for cat, label in label_mapping(categories).items()}
    return predict_images(network, images, root, to_category, batch_size=1, device="cpu",
                          score_threshold=0.05)


def overfit(tmp_path: Path, model: Mapping, iters: int, lr: float,
            optimizer: str = "adamw", **engine) -> dict:
    """Train ``model`` (``training.model``) on the four images for ``iters`` steps; return
    ``{"segm": mask AP, "bbox": box AP, "history": loss DataFrame}`` on the same images."""
    root = tmp_path / "overfit_data"
    images, instances, categories = overfit_tables(root)
    result = _train(tmp_path, (images, instances, categories), model, iters, lr, optimizer,
                    engine)
    saved = result["model"]
    network = load_model(saved["config"], saved["state_dict"])
    predictions = _predictions(network, images, categories, root)
    scored = images.assign(split="val")
    metrics = coco_metrics(scored, instances, categories, predictions, "val")["metrics"]
    return {"segm": metrics["segm"]["mAP"], "bbox": metrics["bbox"]["mAP"],
            "history": result["history"]}


def overfit_panoptic(tmp_path: Path, model: Mapping, iters: int, lr: float,
                     optimizer: str = "adamw", **engine) -> dict:
    """Train a semantic family's ``model`` on the four images with their stuff for ``iters``
    steps; return ``{"pq": pq_metrics (all / things / stuff), "model": the saved model dict,
    "history": loss DataFrame}`` on the same images."""
    from instseg_pipeline.evaluation.panoptic import pq_from_predictions
    from instseg_pipeline.predict.batch import semantic_maps
    from instseg_pipeline.predict.panoptic import panoptic_outputs

    root = tmp_path / "overfit_data"
    tables = _ingested(root)
    images, instances, categories, stuff_segments = tables
    result = _train(tmp_path, tables, model, iters, lr, optimizer, engine)
    saved = result["model"]
    network = load_model(saved["config"], saved["state_dict"])
    predictions = _predictions(network, images, categories, root)
    maps = semantic_maps(network, images, root, batch_size=1, device="cpu")
    panoptic = panoptic_outputs(images, predictions, categories, maps,
                                saved["stuff_category_ids"])
    pq = pq_from_predictions(images, instances, stuff_segments, categories, panoptic)
    return {"pq": pq, "model": saved, "history": result["history"]}
