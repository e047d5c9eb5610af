"""The synthetic data node: a stage of its own for DVC; ingestion calls the same generator,
which does nothing when the files already match the parameters."""
from __future__ import annotations

import logging

from instseg_pipeline.config_schema import as_dict
from instseg_pipeline.data.config import SourceConfig

logger = logging.getLogger(__name__)


def generate_synthetic_data(source: dict) -> dict:
    """Write the synthetic dataset (COCO instances and, beside them, the COCO panoptic
    export) into ``source.root``; return its manifest."""
    config = SourceConfig.from_params(source)
    if config.type != "synthetic":
        logger.info("source.type is %s: nothing to generate", config.type)
        return {"generated": False, "type": config.type}
    from instseg_pipeline.data.sources import synthetic

    return {"generated": True, **synthetic.generate(config.root, as_dict(config.synthetic))}
