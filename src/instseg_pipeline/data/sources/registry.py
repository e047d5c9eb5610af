"""Pick the reader named by ``source.type``; nothing downstream knows which one ran."""
from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING

from instseg_pipeline.data.quality import QualityReport
from instseg_pipeline.data.sources import SourceTables

if TYPE_CHECKING:
    from instseg_pipeline.data.config import SourceConfig

logger = logging.getLogger(__name__)

SOURCE_TYPES = ("synthetic", "coco", "coco_panoptic", "cityscapes", "mask_folder")


def read_source(params: SourceConfig, report: QualityReport) -> SourceTables:
    """Read the source described by ``params`` (the typed ``source`` block) into tables.

    ``synthetic`` first (re)generates its files under ``root`` when they are missing or
    were made with other generator parameters, then reads them: the instances as ``coco``
    does, the stuff segments from its COCO panoptic export (`sources.synthetic.read`).
    """
    kind = params.type
    if kind not in SOURCE_TYPES:
        raise ValueError(f"source.type {kind!r} is not one of {', '.join(SOURCE_TYPES)}")
    if kind == "synthetic":
        from instseg_pipeline.config_schema import as_dict
        from instseg_pipeline.data.sources import synthetic

        synthetic.generate(params.root, as_dict(params.synthetic))
    module = importlib.import_module(f"instseg_pipeline.data.sources.{kind}")
    return module.read(params, report)
