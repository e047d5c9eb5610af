"""Ingestion nodes: thin adapters between the catalog and the Kedro-free readers."""
from __future__ import annotations

import logging

import pandas as pd

from instseg_pipeline.data import statistics
from instseg_pipeline.data.config import IngestionConfig, SourceConfig
from instseg_pipeline.data.pseudo_masks import replace_with_pseudo_masks
from instseg_pipeline.data.quality import QualityReport
from instseg_pipeline.data.sources.registry import read_source
from instseg_pipeline.data.split import assign_splits
from instseg_pipeline.data.tables import check_tables

logger = logging.getLogger(__name__)


def ingest_source(source: dict) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame,
                                         pd.DataFrame, dict]:
    """Read the configured source into the canonical tables (stuff segments: panoptic
    sources only, empty otherwise) and a data-quality report."""
    config = SourceConfig.from_params(source)
    report = QualityReport(config.type, config.on_invalid)
    tables = read_source(config, report)
    check_tables(tables.images, tables.instances, tables.categories, tables.stuff_segments)
    summary = report.summary(tables.images, tables.instances)
    summary["stuff_segments"] = len(tables.stuff_segments)
    summary["mask_sources"] = {str(k): int(v) for k, v in
                               tables.instances["mask_source"].value_counts().sort_index().items()}
    logger.info("ingested %d images, %d instances (%d crowd), %d stuff segments from %s",
                summary["images"], summary["instances"], summary["crowd_instances"],
                len(tables.stuff_segments), config.type)
    return (tables.images, tables.instances, tables.categories, tables.stuff_segments,
            summary)


def split_images(images: pd.DataFrame, ingestion: dict) -> pd.DataFrame:
    """Keep the source's split, else split by hashed image id (``val_fraction``)."""
    config = IngestionConfig.from_params(ingestion)
    return assign_splits(images, config.val_fraction, config.split_seed)


def simulate_box_only(images: pd.DataFrame, instances: pd.DataFrame, source: dict,
                      ingestion: dict) -> pd.DataFrame:
    """``ingestion.box_only``: the instances of ``fraction`` of the train images get
    pseudo-masks from their boxes (``mask_source`` says which); 0 returns them unchanged."""
    box_only = IngestionConfig.from_params(ingestion).box_only
    if box_only.fraction == 0:
        return instances
    root = SourceConfig.from_params(source).root
    replaced, counts = replace_with_pseudo_masks(images, instances, root, box_only.fraction,
                                                 box_only.pseudo_masks())
    logger.info("box-only simulation: %d of %d train images, %d instances given %s "
                "pseudo-masks (%s; fallbacks %s)", counts["images"], counts["train_images"],
                counts["instances"], box_only.method, counts["sources"],
                counts["fallbacks"] or 0)
    return replaced


def compute_dataset_statistics(images: pd.DataFrame, instances: pd.DataFrame,
                               categories: pd.DataFrame) -> dict:
    """Per-split counts by class, size bucket, crowd and instances per image."""
    return statistics.dataset_statistics(images, instances, categories)


def plot_dataset_statistics(stats: dict):
    """The statistics as a matplotlib figure."""
    return statistics.plot_statistics(stats)
