"""Trained model -> model.onnx + manifest, parity report (the run fails on a mismatch),
latency report.

In the default run (``kedro run``, see `pipeline_registry`) the export comes after the
evaluation, so that an ``ExportError`` or a ``ParityError`` ends the run with the metrics
and figures already saved. Kedro orders nodes by data only, so that variant of the pipeline
(``after_evaluation=True``) takes an evaluation output: `await_evaluation` reads
``coco_metrics`` and hands its headline to `export_model`. The sequential runner runs the
pipeline level by level (a node's level is its longest chain of inputs); ``coco_metrics``
is computed on the same level as the other metrics, and the figures drawn from the metrics
sit one level below it, as does ``await_evaluation``: ``export_model`` comes one level
further, after all of them. tests/pipelines/test_export_order.py fails, naming the node,
if an evaluation node ever comes after it. ``kedro run --pipelines export`` alone needs no
evaluation: it exports the latest trained model.

A model of a family that cannot be exported (``OnnxSpec(exportable=False)``) is no error:
`export_model` logs a warning naming the family and the reason and saves a manifest alone
(``exported: false``, the reason); the parity and latency reports say the same and skip the
ONNX work, and the run completes. Serving then uses the torch backend.
"""
from kedro.pipeline import Node, Pipeline

from .nodes import await_evaluation, check_onnx_parity, export_model, measure_latency

# the evaluation outputs the export waits for (small jsons, written by every evaluation):
# coco_metrics gives the headline; pq_metrics is the deepest metric (after panoptic inference),
# so waiting for it also puts the export after the figures drawn from it (the dashboard)
AFTER_EVALUATION = ["coco_metrics", "pq_metrics"]


def create_pipeline(after_evaluation: bool = False, **kwargs) -> Pipeline:
    """The export nodes; with ``after_evaluation`` they wait for `AFTER_EVALUATION`."""
    inputs = ["images", "params:source", "params:export"]
    wait = [Node(await_evaluation, AFTER_EVALUATION, "evaluation_headline",
                 name="await_evaluation")] if after_evaluation else []
    headline = ["evaluation_headline"] if after_evaluation else []
    return Pipeline([
        *wait,
        Node(export_model, ["model", *inputs, *headline], "onnx_model", name="export_model"),
        Node(check_onnx_parity, ["model", "onnx_model", *inputs], "parity_report",
             name="check_onnx_parity"),
        # after parity: the latency of a graph that fails parity means nothing
        Node(measure_latency, ["model", "onnx_model", "parity_report", *inputs],
             "latency_report", name="measure_latency"),
    ])
