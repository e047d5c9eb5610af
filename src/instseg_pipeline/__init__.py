"""instseg-pipeline: instance segmentation as a Kedro project."""
import os

# Nothing this package starts may phone home; users can still override these.
for _key, _value in {
    "KEDRO_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
}.items():
    os.environ.setdefault(_key, _value)

__version__ = "0.1.0"
