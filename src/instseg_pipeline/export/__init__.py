"""ONNX export of a trained model:

- `export.onnx`: tracing (`export_onnx`, `eager_exact_resize`) and the onnxruntime sessions
  (`create_session`, `session_options`) every part of the project runs the graph with;
- `export.manifest`: the JSON file beside ``model.onnx`` (format, SHA-256, classes), written
  at export and read by serving (`find_manifest`, `read_manifest`, `verify_manifest`);
  it imports neither torch, onnx nor Kedro;
- `export.parity`: the gate that compares onnxruntime with eager PyTorch (`check_parity`);
- `export.latency`: eager against onnxruntime run times (`measure_latency`);
- `export.config`: the ``export`` parameters block as a typed config.

Import from the module that holds a name; this package file holds none.
"""
