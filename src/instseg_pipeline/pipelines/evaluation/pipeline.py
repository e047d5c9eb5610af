"""Trained model + tables -> predictions, coco_metrics, pq_metrics, matched mask IoUs."""
from kedro.pipeline import Node, Pipeline

from .nodes import compute_coco_metrics, compute_mask_ious, compute_pq_metrics, predict


def create_pipeline(**kwargs) -> Pipeline:
    tables = ["images", "instances", "categories", "predictions", "params:evaluation"]
    return Pipeline([
        Node(predict, ["model", "images", "categories", "params:source", "params:evaluation"],
             "predictions", name="predict"),
        Node(compute_coco_metrics, tables, ["coco_metrics", "coco_pr_arrays"],
             name="compute_coco_metrics"),
        Node(compute_pq_metrics, tables, "pq_metrics", name="compute_pq_metrics"),
        Node(compute_mask_ious, ["images", "instances", "predictions", "params:evaluation"],
             "matched_mask_ious", name="compute_mask_ious"),
    ])
