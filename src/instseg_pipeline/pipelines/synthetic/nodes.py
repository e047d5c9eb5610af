"""The synthetic data node: a stage of its own for DVC; ingestion calls the same generator,
which does nothing when the files already match the parameters."""
from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def generate_synthetic_data(source: dict) -> dict:
    """Write the synthetic COCO dataset into ``source.root``; return its manifest."""
    if source.get("type") != "synthetic":
        logger.info("source.type is %s: nothing to generate", source.get("type"))
        return {"generated": False, "type": source.get("type")}
    from instseg_pipeline.data.sources import synthetic

    return {"generated": True, **synthetic.generate(source["root"], source.get("synthetic"))}
