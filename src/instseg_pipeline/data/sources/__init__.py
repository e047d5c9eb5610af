"""Data sources: each is a small reader that returns the canonical tables.

A reader has the signature ``read(params: SourceConfig, report: QualityReport) ->
SourceTables``, ``params`` being the typed ``source`` block (`data.config.SourceConfig`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # image-check worker processes import this package: keep pandas out
    import pandas as pd


def _no_stuff() -> pd.DataFrame:
    from instseg_pipeline.data.tables import make_instances

    return make_instances([])


@dataclass
class SourceTables:
    """The canonical tables as one source produced them (split may be empty); only
    panoptic sources have stuff segments."""

    images: pd.DataFrame
    instances: pd.DataFrame
    categories: pd.DataFrame
    stuff_segments: pd.DataFrame = field(default_factory=_no_stuff)
