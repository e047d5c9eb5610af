"""Training: Mask R-CNN from the canonical tables."""
from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
