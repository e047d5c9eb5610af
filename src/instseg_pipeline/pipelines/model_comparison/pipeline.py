"""Tables -> every compared model trained, evaluated and timed -> a table and a figure.

Run alone (``kedro run --pipelines model_comparison``); the default run leaves it out
(`pipeline_registry`): it trains one model per listed family.
"""
from kedro.pipeline import Node, Pipeline

from .nodes import compare_models, plot_model_comparison


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(compare_models, ["images", "instances", "categories", "stuff_segments",
                              "params:source",
                              "params:training", "params:evaluation", "params:export",
                              "params:model_comparison"], "model_comparison",
             name="compare_models"),
        Node(plot_model_comparison, "model_comparison", "model_comparison_plot",
             name="plot_model_comparison"),
    ])
