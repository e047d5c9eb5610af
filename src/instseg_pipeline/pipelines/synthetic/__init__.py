"""Synthetic: (re)generate the built-in dataset (COCO instances + COCO panoptic) under
source.root."""
from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
