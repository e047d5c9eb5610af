"""Counting what ingestion drops, and failing loudly where dropping would be wrong.

Each source decides per case (see README "Bad input"): structural damage (duplicate ids,
dangling references) always fails; a bad image or a bad annotation is skipped and counted
under a reason code, or fails the run when ``on_invalid: fail``. Geometry reason codes
(polygon_*, rle_*, bbox_out_of_bounds) and their limits are listed in `data.masks`; record
reasons (bad_image_record, bad_annotation_record, too_many_pixels) in `sources.coco`.
The first few messages of each reason are logged as warnings, the rest at debug level.
"""
from __future__ import annotations

import logging
from collections import Counter, defaultdict

logger = logging.getLogger(__name__)

_EXAMPLES_KEPT = 5


class IngestionError(ValueError):
    """Input that ingestion refuses; the message names the file / image id / annotation id."""


class QualityReport:
    """Collects dropped items by reason, with a few example messages for each."""

    def __init__(self, source: str, on_invalid: str = "skip"):
        if on_invalid not in ("skip", "fail"):
            raise ValueError(f"on_invalid must be 'skip' or 'fail', not {on_invalid!r}")
        self.source = source
        self.on_invalid = on_invalid
        self.dropped: dict[str, Counter] = {"images": Counter(), "annotations": Counter()}
        self.examples: dict[str, list[str]] = defaultdict(list)
        self.notes: Counter = Counter()

    def drop(self, kind: str, reason: str, message: str) -> None:
        """Drop one image or annotation (``kind``), or raise when the policy is to fail."""
        if self.on_invalid == "fail":
            raise IngestionError(message)
        self.dropped[kind][reason] += 1
        if len(self.examples[reason]) < _EXAMPLES_KEPT:
            self.examples[reason].append(message)
            logger.warning("skipped %s: %s", kind[:-1], message)
        else:
            # every rejected item stays named in the log, without flooding the console
            logger.debug("skipped %s: %s", kind[:-1], message)

    def note(self, key: str, count: int = 1) -> None:
        """Count something kept but changed (e.g. ``converted_mode_L``, ``exif_ignored``)."""
        self.notes[key] += count

    def summary(self, images, instances) -> dict:
        """The ``data_quality_report`` json: what was kept, what was dropped and why."""
        iscrowd = instances["iscrowd"].astype(bool) if len(instances) else instances["iscrowd"]
        report = {
            "source": self.source,
            "on_invalid": self.on_invalid,
            "images": len(images),
            "images_without_instances": int((~images["image_id"].isin(
                instances["image_id"])).sum()),
            "instances": len(instances),
            "crowd_instances": int(iscrowd.sum()),
            "dropped": {kind: dict(sorted(c.items())) for kind, c in self.dropped.items()},
            "dropped_total": {kind: int(sum(c.values())) for kind, c in self.dropped.items()},
            "notes": dict(sorted(self.notes.items())),
            "examples": dict(self.examples),
        }
        for kind, count in report["dropped_total"].items():
            if count:
                logger.warning("%s: dropped %d %s: %s", self.source, count, kind,
                               report["dropped"][kind])
        return report
