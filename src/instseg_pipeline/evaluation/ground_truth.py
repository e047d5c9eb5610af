"""Which instances may serve as evaluation ground truth.

A pseudo-mask (``mask_source`` grabcut, box or sam: made from a box, `data.tables.PSEUDO`)
is not ground truth: mask AP against it measures agreement with the method that made it.
Every evaluation that builds ground truth from the tables (COCO AP, PQ, Cityscapes AP, the
matched-IoU and pixel tables, through `evaluation.metrics`) first calls
`check_pseudo_masks`: it raises `PseudoMaskError` unless ``evaluation.allow_pseudo_masks``
is true, and then logs one WARNING with the same facts (once per process for the same
instances, however many metrics read them). Crowd rows are not special: a pseudo crowd
region counts like any other row.
"""
from __future__ import annotations

import logging

import pandas as pd

from instseg_pipeline.data.tables import ANNOTATED, select_split, tables_to_coco

logger = logging.getLogger(__name__)

PARAMETER = "evaluation.allow_pseudo_masks"
SHOWN_IDS = 5  # annotation ids named in the message
_warned: set[tuple] = set()


class PseudoMaskError(ValueError):
    """The evaluated split holds instances whose masks are pseudo-masks."""


def pseudo_mask_rows(instances: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``instances`` whose ``mask_source`` is not ``annotated`` (none when the
    table has no such column)."""
    if "mask_source" not in instances.columns:
        return instances.iloc[:0]
    return instances[instances["mask_source"].astype(str) != ANNOTATED]


def _ids(rows: pd.DataFrame) -> pd.Series:
    """The source's own ids of ``rows`` (``annotation_id``; ``instance_id`` without it)."""
    return rows["annotation_id"] if "annotation_id" in rows.columns else rows["instance_id"]


def describe_pseudo_masks(pseudo: pd.DataFrame, total: int, split: str | None) -> str:
    """``pseudo`` (`pseudo_mask_rows` of ``total`` instances) in words: how many, per
    method, the first `SHOWN_IDS` annotation ids."""
    shown = ", ".join(str(int(i)) for i in _ids(pseudo).head(SHOWN_IDS))
    more = f" and {len(pseudo) - SHOWN_IDS} more" if len(pseudo) > SHOWN_IDS else ""
    methods = ", ".join(f"{name} {count}" for name, count in
                        pseudo["mask_source"].astype(str).value_counts().sort_index().items())
    where = f"the {split} split" if split is not None else "the evaluated images"
    return (f"{len(pseudo)} of {total} instances of {where} have pseudo-masks (mask_source "
            f"{methods}; annotation ids {shown}{more})")


def check_pseudo_masks(instances: pd.DataFrame, allow: bool = False,
                       split: str | None = None, allowed_by: str = f"{PARAMETER}: true"
                       ) -> None:
    """Refuse ground truth with pseudo-masks unless ``allow``.

    ``instances``: the instances evaluated against (already the split's). Raises
    `PseudoMaskError` naming how many instances, the methods, the first annotation ids and
    `PARAMETER`; with ``allow`` logs that as a WARNING instead (``allowed_by`` says why
    they are scored), once per process for the same facts.
    """
    pseudo = pseudo_mask_rows(instances)
    if not len(pseudo):
        return
    facts = describe_pseudo_masks(pseudo, len(instances), split)
    if not allow:
        raise PseudoMaskError(
            f"{facts}: a pseudo-mask is not ground truth, so mask metrics against it measure "
            "agreement with the method that made it. Evaluate on a split with annotated "
            f"masks, or set {PARAMETER}: true to score against them anyway")
    # the pseudo rows themselves, not the total: PQ reads the stuff segments too
    key = (split, len(pseudo), tuple(_ids(pseudo).head(SHOWN_IDS).tolist()))
    if key not in _warned:
        _warned.add(key)
        logger.warning("%s; they are scored as ground truth (%s), so mask metrics measure "
                       "agreement with the pseudo-mask method there", facts, allowed_by)


def coco_ground_truth(images: pd.DataFrame, instances: pd.DataFrame,
                      categories: pd.DataFrame, split: str | None = None,
                      allow_pseudo_masks: bool = False,
                      allowed_by: str = f"{PARAMETER}: true"):
    """`data.tables.tables_to_coco` of the ``split`` (all images when None) after
    `check_pseudo_masks` on its instances: a pycocotools ``COCO`` object. Model selection
    passes ``allow_pseudo_masks=True, allowed_by="model selection"``: it ranks one run's
    checkpoints, and the evaluation nodes still refuse."""
    images, instances = select_split(images, instances, split)
    check_pseudo_masks(instances, allow_pseudo_masks, split, allowed_by)
    return tables_to_coco(images, instances, categories)
