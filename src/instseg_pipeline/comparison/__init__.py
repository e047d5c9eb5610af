"""Model families side by side (Kedro-free): the same tables and training budget for each,
mask and box AP through the project's inference path and COCO evaluation, images/s at batch
1 in eager torch and ONNX Runtime, and parameter counts; the ``model_comparison`` pipeline
and ``benchmarks/families.py`` use it."""
