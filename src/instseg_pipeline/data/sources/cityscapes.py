"""Cityscapes source: ``leftImg8bit`` images + ``gtFine`` instanceIds PNGs -> canonical tables.

Layout under ``params.root``::

    leftImg8bit/{split}/{city}/{name}_leftImg8bit.png
    gtFine/{split}/{city}/{name}_gtFine_instanceIds.png    (labelIds / polygons.json unused)

Parameters: ``root``; ``splits`` (default ``[train, val]``; ``test`` is skipped because its
gtFine holds no instance labels); ``verify_images`` ``decode`` (default) or ``header``.
A requested split whose ``leftImg8bit/{split}`` folder is missing (a ``val``-only download)
is logged by name and counted as the note ``missing_split_{split}``; the run fails only when
none of the requested labelled splits exists.

The instanceIds PNG (16 bit) is read at full bit depth. A pixel value ``v >= 1000`` is instance
``v % 1000`` of label id ``v // 1000``; a value ``v < 1000`` is a bare label id, which for an
instance class marks a group region ("cars" without a separate outline), kept as one crowd
instance per class per image. Only the 8 classes the official benchmark evaluates are kept,
with their official label ids as ``category_id``; caravan (29) and trailer (30) have instance
ids but are ignored in evaluation, so they are dropped and counted as ``ignored_label_<id>``.

Ids, stable for a given file set (dropping an image never renumbers the others):
- ``image_id``: 1-based position of the image's relative path (``leftImg8bit/...``) in sorted
  order over the chosen splits.
- ``instance_id``: ``image_id * 100_000 + pixel value`` (crowd regions: the bare label id), so
  every instance names its pixels in the instanceIds PNG.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from instseg_pipeline.data.images import ImageProblem, read_id_map
from instseg_pipeline.data.quality import IngestionError, QualityReport
from instseg_pipeline.data.sources import SourceTables
from instseg_pipeline.data.sources.checks import verify_mode
from instseg_pipeline.data.sources.mask_folder import (
    ID_FACTOR,
    check_image,
    id_values,
    instance_row,
    read_images,
)
from instseg_pipeline.data.tables import make_categories, make_images, make_instances

if TYPE_CHECKING:
    from instseg_pipeline.data.config import SourceConfig

logger = logging.getLogger(__name__)

SOURCE = "cityscapes"
IMAGE_SUFFIX = "_leftImg8bit.png"
INSTANCE_SUFFIX = "_gtFine_instanceIds.png"
LABEL_FACTOR = 1000  # instance pixel value = label id * 1000 + instance index
UNLABELLED_SPLITS = ("test",)
# The official evaluated instance classes: name, label id, supercategory.
CLASSES = (("person", 24, "human"), ("rider", 25, "human"), ("car", 26, "vehicle"),
           ("truck", 27, "vehicle"), ("bus", 28, "vehicle"), ("train", 31, "vehicle"),
           ("motorcycle", 32, "vehicle"), ("bicycle", 33, "vehicle"))
CATEGORY_IDS = frozenset(label for _, label, _ in CLASSES)
IGNORED_INSTANCE_LABELS = frozenset((29, 30))  # caravan, trailer: hasInstances, ignoreInEval


def categories_rows() -> list[dict]:
    """``categories`` rows of the 8 evaluated classes (category_id = official label id)."""
    return [{"category_id": label, "name": name, "supercategory": sup, "isthing": True}
            for name, label, sup in CLASSES]


def _splits(params: SourceConfig) -> list[str]:
    splits = [params.splits] if isinstance(params.splits, str) else list(params.splits)
    for split in splits:
        if split in UNLABELLED_SPLITS:
            logger.info("%s: skipping split '%s' (gtFine has no instance labels for it)",
                        SOURCE, split)
    return [s for s in splits if s not in UNLABELLED_SPLITS]


def present_splits(root: Path, splits: list[str], report: QualityReport) -> list[str]:
    """The split names in ``splits`` whose ``root/leftImg8bit/{split}`` folder exists, in order.

    A missing one is logged by name and noted as ``missing_split_{split}`` (partial downloads,
    e.g. only ``val``, are common); raises ``IngestionError`` naming ``root`` and the splits
    looked for when none exists, since then there is nothing to ingest.
    """
    folder = root / "leftImg8bit"
    if not splits:
        raise IngestionError(f"{SOURCE}: source.splits names no split with instance labels "
                             f"to read under {folder} (test has none)")
    present = [split for split in splits if (folder / split).is_dir()]
    if not present:
        raise IngestionError(
            f"{SOURCE}: none of the requested splits {splits} found under {folder} "
            f"(looked for {', '.join(str(folder / s) for s in splits)}); "
            "set source.root to the Cityscapes root, or source.splits to the split folders "
            "you have")
    for split in splits:
        if split not in present:
            logger.warning("%s: split folder %s not found; skipping split '%s' (reading %s)",
                           SOURCE, folder / split, split, present)
            report.note(f"missing_split_{split}")
    return present


def find_images(root: Path, splits: list[str]) -> list[tuple[Path, str]]:
    """(image path, split) pairs sorted by path relative to ``root``; a missing split fails
    (``read`` passes only the splits ``present_splits`` found)."""
    found = []
    for split in splits:
        folder = root / "leftImg8bit" / split
        if not folder.is_dir():
            raise IngestionError(f"{SOURCE}: split folder {folder} not found")
        found += [(path, split) for path in folder.glob(f"*/*{IMAGE_SUFFIX}") if path.is_file()]
    return sorted(found, key=lambda pair: pair[0].relative_to(root).as_posix())


def annotation_path(root: Path, image: Path, split: str) -> Path:
    """gtFine instanceIds PNG of a leftImg8bit image."""
    name = image.name[: -len(IMAGE_SUFFIX)] + INSTANCE_SUFFIX
    return root / "gtFine" / split / image.parent.name / name


def _label_of(value: int) -> tuple[int, bool]:
    """(label id, iscrowd) of an instanceIds pixel value."""
    if value >= LABEL_FACTOR:
        return value // LABEL_FACTOR, False
    return value, True


def cityscapes_instances(ids: np.ndarray, image_id: int, report: QualityReport) -> list[dict]:
    """``instances`` rows of an int64 [H, W] instanceIds map (evaluated classes only)."""
    rows = []
    for value in id_values(ids):
        label, crowd = _label_of(value)
        if label not in CATEGORY_IDS:
            if label in IGNORED_INSTANCE_LABELS:
                report.note(f"ignored_label_{label}")
            continue
        rows.append(instance_row(ids == value, image_id * ID_FACTOR + value, image_id, label,
                                 crowd))
    return rows


def _read_annotation(image: Path, path: Path, report: QualityReport) -> np.ndarray | None:
    if not path.is_file():
        report.drop("images", "missing_annotation",
                    f"{image}: instance annotation {path} not found")
        return None
    try:
        return read_id_map(path)
    except ImageProblem as exc:
        report.drop("images", exc.reason, str(exc))
        return None


def _read_one(image: Path, split: str, image_id: int, params: SourceConfig,
              report: QualityReport) -> tuple[dict | None, list[dict]]:
    root = Path(params.root)
    path = annotation_path(root, image, split)
    ids = _read_annotation(image, path, report)
    if ids is None or not check_image(image, (ids.shape[1], ids.shape[0]), path, params,
                                      report):
        return None, []
    row = {"image_id": image_id, "file_name": image.relative_to(root).as_posix(),
           "width": ids.shape[1], "height": ids.shape[0], "split": split, "source": SOURCE}
    return row, cityscapes_instances(ids, image_id, report)


def read(params: SourceConfig, report: QualityReport) -> SourceTables:
    """Canonical tables of a Cityscapes tree (see the module docstring for ``params``)."""
    verify_mode(params)
    root = Path(params.root)
    found = find_images(root, present_splits(root, _splits(params), report))
    logger.info("%s: %d images under %s", SOURCE, len(found), root / "leftImg8bit")
    images, instances = read_images(
        found, lambda image, split, image_id: _read_one(image, split, image_id, params, report),
        SOURCE, report)
    return SourceTables(make_images(images), make_instances(instances),
                        make_categories(categories_rows()))
