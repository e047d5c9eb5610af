"""Weak supervision: what pseudo-masks from boxes cost, in mask IoU and in mask AP."""
from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
