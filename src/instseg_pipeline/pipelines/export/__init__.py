"""Export: the trained model as ONNX, gated by parity with eager PyTorch, and its latency."""
from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
