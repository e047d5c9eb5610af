"""Data sources: each is a small reader that returns the canonical tables.

A reader has the signature ``read(params: SourceConfig, report: QualityReport) ->
SourceTables``, ``params`` being the typed ``source`` block (`data.config.SourceConfig`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # image-check worker processes import this package: keep pandas out
    import pandas as pd


@dataclass
class SourceTables:
    """The three canonical tables as one source produced them (split may be empty)."""

    images: pd.DataFrame
    instances: pd.DataFrame
    categories: pd.DataFrame
