"""Model comparison: every listed family on the same tables and budget, AP, speed, size."""
from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
