"""Raw source -> images / instances / categories (+ stuff_segments of panoptic sources), a
quality report and statistics; ``ingestion.box_only`` swaps a share of the train masks for
pseudo-masks after the split."""
from kedro.pipeline import Node, Pipeline

from .nodes import (
    compute_dataset_statistics,
    ingest_source,
    plot_dataset_statistics,
    simulate_box_only,
    split_images,
)


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(ingest_source, "params:source",
             ["unsplit_images", "source_instances", "categories", "stuff_segments",
              "data_quality_report"],
             name="ingest_source"),
        Node(split_images, ["unsplit_images", "params:ingestion"], "images",
             name="split_images"),
        Node(simulate_box_only,
             ["images", "source_instances", "params:source", "params:ingestion"], "instances",
             name="simulate_box_only"),
        Node(compute_dataset_statistics, ["images", "instances", "categories"],
             "dataset_statistics", name="compute_dataset_statistics"),
        Node(plot_dataset_statistics, "dataset_statistics", "dataset_statistics_plot",
             name="plot_dataset_statistics"),
    ])
