"""Trained model -> model.onnx + manifest, parity report (the run fails on a mismatch),
latency report."""
from kedro.pipeline import Node, Pipeline

from .nodes import check_onnx_parity, export_model, measure_latency


def create_pipeline(**kwargs) -> Pipeline:
    inputs = ["images", "params:source", "params:export"]
    return Pipeline([
        Node(export_model, ["model", *inputs], "onnx_model", name="export_model"),
        Node(check_onnx_parity, ["model", "onnx_model", *inputs], "parity_report",
             name="check_onnx_parity"),
        # after parity: the latency of a graph that fails parity means nothing
        Node(measure_latency, ["model", "onnx_model", "parity_report", *inputs],
             "latency_report", name="measure_latency"),
    ])
