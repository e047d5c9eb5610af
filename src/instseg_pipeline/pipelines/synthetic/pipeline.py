"""params:source -> the synthetic dataset on disk (data/01_raw/<name>)."""
from kedro.pipeline import Node, Pipeline

from .nodes import generate_synthetic_data


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([Node(generate_synthetic_data, "params:source", "synthetic_manifest",
                          name="generate_synthetic_data")])
