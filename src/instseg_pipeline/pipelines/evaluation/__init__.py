"""Evaluation: predictions on the val split, COCO AP, panoptic quality, figures."""
from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
