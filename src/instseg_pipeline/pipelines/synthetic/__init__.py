"""Synthetic: (re)generate the built-in COCO-format dataset under source.root."""
from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
