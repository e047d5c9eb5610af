"""Mask-folder source: ``images/`` + ``masks/``, one mask PNG per image holding one id per
instance (0 = background), the Penn-Fudan layout.

Parameters (``params``, the typed ``source`` block `data.config.SourceConfig`):
- ``root``: the folder holding both sub-folders; ``file_name`` is relative to it.
- ``images`` / ``masks``: sub-folder names (defaults ``images`` / ``masks``; Penn-Fudan:
  ``PNGImages`` / ``PedMasks``).
- ``mask_suffix`` (default ``""``, Penn-Fudan ``"_mask"``) and ``mask_ext`` (default ``.png``):
  the mask of ``images/<stem>.<ext>`` is ``masks/<stem><mask_suffix><mask_ext>``.
- ``image_glob``: file name patterns, matched case-insensitively (default png / jpg / jpeg).
- ``class_name`` (default ``object``): the class of every id that ``class_map`` does not name;
  null drops unnamed ids (counted as note ``unmapped_id``).
- ``class_map`` ``{id value: class name or null}`` or ``class_map_file`` (json / yaml,
  relative to root): the class of each mask id value, the same in every image; null ignores
  the id (e.g. a 255 "void" border).
- ``split``: the split of images lying directly in ``images/`` (default ``""``: assigned later
  by the split node). Images in ``images/train``, ``images/val``, ``images/test`` take the
  folder name as split and their masks are looked up in ``masks/<split>/``.
- ``verify_images``: ``decode`` (default: every image must decode) or ``header`` (header only).

Ids, stable for a given file set (dropping an image never renumbers the others):
- ``image_id``: 1-based position of the image's relative path in sorted order.
- ``instance_id``: ``image_id * 100_000 + mask id value``, so an instance names its pixels.
- ``category_id``: 1..K over the class names in alphabetical order.

The generic helpers here (`check_image`, `instance_row`, `read_images`) are shared with the
cityscapes source, whose instanceIds PNG is one more id map.
"""
from __future__ import annotations

import fnmatch
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from instseg_pipeline.data.images import ImageProblem, read_id_map
from instseg_pipeline.data.masks import bitmap_to_rle, rle_area, rle_bbox, rle_to_string
from instseg_pipeline.data.quality import IngestionError, QualityReport
from instseg_pipeline.data.sources import SourceTables, checks
from instseg_pipeline.data.tables import make_categories, make_images, make_instances
from instseg_pipeline.progress import progress as log_progress

if TYPE_CHECKING:
    from instseg_pipeline.data.config import SourceConfig

logger = logging.getLogger(__name__)

SOURCE = "mask_folder"
ID_FACTOR = 100_000  # instance_id = image_id * ID_FACTOR + mask value; values must stay below
SPLIT_DIRS = ("train", "val", "test")

# ---------------------------------------------------------------- shared with cityscapes
def id_values(ids: np.ndarray) -> list[int]:
    """Sorted distinct values of an int64 [H, W] id map."""
    if ids.min() >= 0 and ids.max() < 1 << 20:  # counting beats sorting for 8/16-bit ids
        return np.flatnonzero(np.bincount(ids.ravel(order="K"))).tolist()
    return np.unique(ids).tolist()


def check_image(path: Path, size: tuple[int, int], mask_path: Path, params: SourceConfig,
                report: QualityReport) -> bool:
    """True when the image at ``path`` fits its mask of ``size`` = (width, height)."""
    return checks.check_image(path, size, params, report, label=f"image {path.name}",
                              expected_from=f"its mask {mask_path} is")


def instance_row(mask: np.ndarray, instance_id: int, image_id: int, category_id: int,
                 iscrowd: bool) -> dict:
    """One ``instances`` row for a bool [H, W] mask (compressed RLE, area, COCO box)."""
    rle = bitmap_to_rle(mask)
    return {"instance_id": instance_id, "image_id": image_id, "category_id": category_id,
            "bbox": rle_bbox(rle), "area": rle_area(rle), "iscrowd": bool(iscrowd),
            "rle": rle_to_string(rle)}


def progress(items: list, description: str):
    """A bar over ``items`` in a terminal, periodic log lines elsewhere."""
    return log_progress(items, desc=description, unit="img", logger=logger)


def read_images(found: list[tuple[Path, str]], read_one, source: str,
                report: QualityReport) -> tuple[list[dict], list[dict]]:
    """``images`` and ``instances`` rows of the (image path, split) pairs in ``found``,
    image ids 1, 2, ... in that order; ``read_one(image, split, image_id)`` returns the
    image's row (None when dropped) and its instance rows. Logs what was kept and dropped."""
    images, instances = [], []
    for image_id, (image, split) in enumerate(progress(found, source), start=1):
        row, rows = read_one(image, split, image_id)
        if row is not None:
            images.append(row)
            instances.extend(rows)
    crowd = sum(1 for row in instances if row["iscrowd"])
    dropped = sum(report.dropped["images"].values())
    logger.info("%s: %d images, %d instances (%d crowd), %d images dropped %s", source,
                len(images), len(instances), crowd, dropped, dict(report.dropped["images"]))
    return images, instances


# ---------------------------------------------------------------- classes
def _load_class_file(root: Path, name: str) -> dict:
    path = root / name
    if not path.is_file():
        raise IngestionError(f"class_map_file {path} not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yml", ".yaml"):
        import yaml

        return yaml.safe_load(text) or {}
    return json.loads(text)


def load_class_map(params: SourceConfig, root: Path) -> dict[int, str | None]:
    """``{mask id value: class name or None}`` from ``class_map`` or ``class_map_file``."""
    raw = params.class_map
    if raw is None and params.class_map_file:
        raw = _load_class_file(root, params.class_map_file)
    try:
        return {int(value): (None if name is None else str(name))
                for value, name in (raw or {}).items()}
    except (TypeError, ValueError, AttributeError) as exc:
        raise IngestionError(f"class_map must map integer mask ids to class names ({exc})"
                             ) from None


def category_ids(class_map: dict[int, str | None], class_name: str | None) -> dict[str, int]:
    """``{class name: category id}``: 1..K in alphabetical order of the names."""
    names = {name for name in class_map.values() if name is not None}
    if class_name is not None:
        names.add(class_name)
    if not names:
        raise IngestionError("mask_folder has no classes: class_name is null and class_map "
                             "names none")
    return {name: index for index, name in enumerate(sorted(names), start=1)}


def _category_rows(ids: dict[str, int]) -> list[dict]:
    return [{"category_id": cid, "name": name, "supercategory": name, "isthing": True}
            for name, cid in ids.items()]


# ---------------------------------------------------------------- files
def _matches(path: Path, patterns) -> bool:
    name = path.name.lower()
    return path.is_file() and any(fnmatch.fnmatch(name, p.lower()) for p in patterns)


def _glob_patterns(params: SourceConfig) -> tuple[str, ...]:
    patterns = params.image_glob
    return (patterns,) if isinstance(patterns, str) else tuple(patterns)


def find_images(image_dir: Path, params: SourceConfig) -> list[tuple[Path, str]]:
    """(image path, split) pairs: files in ``image_dir`` and in its split sub-folders."""
    patterns = _glob_patterns(params)
    folders = [(image_dir, params.split)]
    folders += [(image_dir / s, s) for s in SPLIT_DIRS if (image_dir / s).is_dir()]
    return [(path, split) for folder, split in folders
            for path in sorted(folder.iterdir()) if _matches(path, patterns)]


def _folders(params: SourceConfig) -> tuple[Path, Path, Path]:
    root = Path(params.root)
    image_dir = root / params.images
    mask_dir = root / params.masks
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            raise IngestionError(f"mask_folder: folder {folder} not found")
    return root, image_dir, mask_dir


def mask_path_for(image: Path, image_dir: Path, mask_dir: Path,
                  params: SourceConfig) -> Path:
    """The mask file of ``image``: same sub-folder under ``mask_dir``, stem + suffix + ext."""
    relative = image.parent.relative_to(image_dir)
    name = image.stem + params.mask_suffix + params.mask_ext
    return mask_dir / relative / name


# ---------------------------------------------------------------- one image
def _id_problem(ids: np.ndarray, mask_path: Path) -> ImageProblem | None:
    if ids.min() >= 0 and ids.max() < ID_FACTOR:
        return None
    bad = np.unique(ids[(ids < 0) | (ids >= ID_FACTOR)])[:5].tolist()
    return ImageProblem("mask_id_out_of_range",
                        f"{mask_path}: mask ids {bad} are outside 0..{ID_FACTOR - 1}")


def _class_of(value: int, class_map: dict, class_name: str | None) -> str | None:
    return class_map.get(value, class_name)


def mask_instances(ids: np.ndarray, image_id: int, classes: dict, report: QualityReport
                   ) -> list[dict]:
    """``instances`` rows of an int64 [H, W] id map, one per nonzero id value.

    ``classes`` holds ``class_map``, ``class_name`` and ``category_ids``. Touching instances
    stay apart because each id value is its own mask.
    """
    rows = []
    for value in id_values(ids):
        if value == 0:
            continue
        name = _class_of(value, classes["class_map"], classes["class_name"])
        if name is None:
            report.note("unmapped_id")
            continue
        rows.append(instance_row(ids == value, image_id * ID_FACTOR + value, image_id,
                                 classes["category_ids"][name], False))
    return rows


def _read_mask(image: Path, mask_path: Path, report: QualityReport) -> np.ndarray | None:
    if not mask_path.is_file():
        report.drop("images", "missing_mask", f"{image}: mask file {mask_path} not found")
        return None
    try:
        ids = read_id_map(mask_path)
        problem = _id_problem(ids, mask_path)
        if problem:
            raise problem
    except ImageProblem as exc:
        report.drop("images", exc.reason, str(exc))
        return None
    return ids


@dataclass
class _Context:
    """What every image of one read shares."""

    params: SourceConfig
    root: Path
    image_dir: Path
    mask_dir: Path
    classes: dict
    seen_masks: dict = field(default_factory=dict)  # mask path -> the image that claimed it


def _claim_mask(image: Path, mask_path: Path, ctx: _Context, report: QualityReport) -> bool:
    # two images with one stem (a.png, a.jpg) would silently share one mask
    owner = ctx.seen_masks.setdefault(mask_path, image)
    if owner != image:
        report.drop("images", "ambiguous_mask",
                    f"{image}: its mask {mask_path} already belongs to {owner}")
    return owner == image


def _read_one(image: Path, split: str, image_id: int, ctx: _Context,
              report: QualityReport) -> tuple[dict | None, list[dict]]:
    mask_path = mask_path_for(image, ctx.image_dir, ctx.mask_dir, ctx.params)
    if not _claim_mask(image, mask_path, ctx, report):
        return None, []
    ids = _read_mask(image, mask_path, report)
    if ids is None or not check_image(image, (ids.shape[1], ids.shape[0]), mask_path,
                                      ctx.params, report):
        return None, []
    row = {"image_id": image_id, "file_name": image.relative_to(ctx.root).as_posix(),
           "width": ids.shape[1], "height": ids.shape[0], "split": split, "source": SOURCE}
    return row, mask_instances(ids, image_id, ctx.classes, report)


# ---------------------------------------------------------------- reader
def _classes(params: SourceConfig, root: Path) -> dict:
    class_map = load_class_map(params, root)
    class_name = params.class_name
    return {"class_map": class_map, "class_name": class_name,
            "category_ids": category_ids(class_map, class_name)}


def read(params: SourceConfig, report: QualityReport) -> SourceTables:
    """Canonical tables of a mask folder (see the module docstring for ``params``)."""
    checks.verify_mode(params)
    root, image_dir, mask_dir = _folders(params)
    ctx = _Context(params, root, image_dir, mask_dir, _classes(params, root))
    found = sorted(find_images(image_dir, params),
                   key=lambda pair: pair[0].relative_to(root).as_posix())
    logger.info("%s: %d image files under %s", SOURCE, len(found), image_dir)
    images, instances = read_images(
        found, lambda image, split, image_id: _read_one(image, split, image_id, ctx, report),
        SOURCE, report)
    return SourceTables(make_images(images), make_instances(instances),
                        make_categories(_category_rows(ctx.classes["category_ids"])))
