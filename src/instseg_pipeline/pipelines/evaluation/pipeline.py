"""Trained model + tables -> predictions, panoptic_predictions, coco_metrics, pq_metrics,
cityscapes_metrics, matched mask IoUs and the figures (visualisation suite, panoptic
overlay, dashboard, error analysis)."""
from kedro.pipeline import Node, Pipeline

from .nodes import (
    compute_cityscapes_metrics,
    compute_coco_metrics,
    compute_mask_ious,
    compute_pq_metrics,
    plot_error_analysis,
    plot_panoptic_overlay,
    plot_performance_dashboard,
    plot_visualisation_suite,
    predict,
    predict_panoptic,
    write_panoptic_ground_truth,
)


def create_pipeline(**kwargs) -> Pipeline:
    tables = ["images", "instances", "categories", "predictions", "params:evaluation"]
    figure_inputs = ["images", "instances", "categories", "predictions"]
    panoptic_tables = ["images", "instances", "stuff_segments", "categories",
                       "panoptic_predictions"]
    return Pipeline([
        Node(predict, ["model", "images", "categories", "params:source", "params:evaluation"],
             "predictions", name="predict"),
        Node(compute_coco_metrics, tables, ["coco_metrics", "coco_pr_arrays"],
             name="compute_coco_metrics"),
        Node(predict_panoptic,
             ["model", "images", "categories", "predictions", "params:source",
              "params:evaluation"], "panoptic_predictions", name="predict_panoptic"),
        Node(compute_pq_metrics, [*panoptic_tables, "params:evaluation"], "pq_metrics",
             name="compute_pq_metrics"),
        Node(write_panoptic_ground_truth, [*panoptic_tables, "params:evaluation"],
             "panoptic_ground_truth", name="write_panoptic_ground_truth"),
        Node(compute_cityscapes_metrics,
             ["images", "instances", "categories", "predictions", "params:source",
              "params:evaluation"], "cityscapes_metrics", name="compute_cityscapes_metrics"),
        Node(compute_mask_ious, ["images", "instances", "predictions", "params:evaluation"],
             "matched_mask_ious", name="compute_mask_ious"),
        Node(plot_visualisation_suite, [*figure_inputs, "params:source", "params:evaluation"],
             "visualisation_suite", name="plot_visualisation_suite"),
        Node(plot_panoptic_overlay, [*panoptic_tables, "params:source", "params:evaluation"],
             "panoptic_overlay", name="plot_panoptic_overlay"),
        Node(plot_performance_dashboard,
             ["coco_metrics", "coco_pr_arrays", "pq_metrics", "matched_mask_ious",
              "training_history", "validation_history", "categories", "predictions", "images",
              "instances", "params:source", "params:evaluation"],
             "performance_dashboard", name="plot_performance_dashboard"),
        Node(plot_error_analysis,
             [*figure_inputs, "matched_mask_ious", "params:source", "params:evaluation"],
             ["worst_and_best_images", "false_positive_gallery", "false_negative_gallery"],
             name="plot_error_analysis"),
    ])
