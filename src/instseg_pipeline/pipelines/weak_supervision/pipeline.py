"""Tables -> pseudo-mask quality (IoU against the annotated masks) and one model per mask
variant (full, box, grabcut, mixed) at the same budget -> reports and figures.

Run alone (``kedro run --pipelines weak_supervision``); the default run leaves it out
(`pipeline_registry`): it trains one model per variant.
"""
from kedro.pipeline import Node, Pipeline

from .nodes import (
    compare_weak_supervision,
    measure_pseudo_mask_quality,
    plot_pseudo_mask_quality,
    plot_weak_supervision_comparison,
)


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(measure_pseudo_mask_quality,
             ["images", "instances", "categories", "params:source", "params:weak_supervision"],
             "pseudo_mask_quality", name="measure_pseudo_mask_quality"),
        Node(plot_pseudo_mask_quality, "pseudo_mask_quality", "pseudo_mask_quality_plot",
             name="plot_pseudo_mask_quality"),
        Node(compare_weak_supervision,
             ["images", "instances", "categories", "stuff_segments", "params:source",
              "params:training", "params:evaluation", "params:weak_supervision"],
             "weak_supervision_comparison", name="compare_weak_supervision"),
        Node(plot_weak_supervision_comparison, "weak_supervision_comparison",
             "weak_supervision_comparison_plot", name="plot_weak_supervision_comparison"),
    ])
