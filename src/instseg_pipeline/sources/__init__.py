"""Data sources: each is a small reader that returns the canonical tables.

A reader has the signature ``read(params: dict, report: QualityReport) -> SourceTables``.
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd


@dataclass
class SourceTables:
    """The three canonical tables as one source produced them (split may be empty)."""

    images: pd.DataFrame
    instances: pd.DataFrame
    categories: pd.DataFrame
