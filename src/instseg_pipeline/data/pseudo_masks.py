"""Pseudo-masks from boxes: instance masks for data annotated with boxes only.

One `PseudoMaskConfig` (the ``source.pseudo_masks`` block, and the pseudo-mask keys of
``ingestion.box_only``; defined with the other schemas in `data.config`) picks the method:

- ``box``: the filled box, clipped to the image;
- ``grabcut``: OpenCV GrabCut seeded from the box (inside: probable foreground; a ring of
  ``grabcut_margin`` pixels around it: certain background, the colours the background model
  learns from), ``grabcut_iterations`` rounds, then only the largest connected component and
  those at least `COMPONENT_SHARE` of its size (an object cut in two by an occluder keeps
  both halves, specks go). GrabCut costs O(pixels x iterations), so a crop whose longer side
  exceeds `GRABCUT_MAX_SIDE` is segmented downscaled to that side and the result scaled back
  (smooth edges, box-precise extent); the kmeans start of its colour models is seeded with
  ``seed`` before every box, so a box gets the same mask in any process and order;
- ``sam``: Segment Anything prompted with each box (``sam_checkpoint``, ``sam_model_type``;
  `predict.sam`, torch imported only there), the mask cut to its box.

Every pseudo-mask lies inside its box. One covering no pixel of it, or less than
``min_fill`` / more than ``max_fill`` of it, is replaced by the filled box and counted under
a reason: ``grabcut_collapsed`` (empty, or GrabCut failed), ``sam_failed`` (empty SAM mask),
``too_small_in_box``, ``too_large_in_box``.

`generate` runs many images in ``workers`` processes (``sam``: in this process, one model)
and returns the masks as RLE strings; `replace_with_pseudo_masks` simulates box-only data on
a fraction of the train images of tables that have true masks. numpy and cv2 only at import.
"""
from __future__ import annotations

import functools
import logging
import math
import multiprocessing
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from instseg_pipeline.data import masks as mask_codec
from instseg_pipeline.data.config import PseudoMaskConfig
from instseg_pipeline.data.images import load_image
from instseg_pipeline.progress import progress as progress_bar

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

FALLBACK_REASONS = ("grabcut_collapsed", "too_small_in_box", "too_large_in_box", "sam_failed")
GRABCUT_MAX_SIDE = 256   # longer crop sides are segmented downscaled to this
COMPONENT_SHARE = 0.25   # components kept: at least this share of the largest one


@dataclass(frozen=True)
class PseudoMasks:
    """masks bool [N, H, W] (one per box, inside it); sources[i]: ``grabcut`` / ``sam`` /
    ``box`` (the method, or the filled box after a fallback); fallbacks[i]: None or the
    reason code of the fallback."""

    masks: np.ndarray
    sources: list[str]
    fallbacks: list[str | None]


@dataclass(frozen=True)
class EncodedPseudoMasks:
    """What `generate` returns per image: compressed RLE strings of the full-size masks,
    their areas in pixels, and sources / fallbacks as in `PseudoMasks`."""

    rles: list[str]
    areas: list[int]
    sources: list[str]
    fallbacks: list[str | None]


# --- boxes ------------------------------------------------------------------------------------

def _span(start: float, size: float, limit: int) -> tuple[int, int]:
    low = min(max(math.floor(start + 0.5), 0), limit)
    high = min(max(math.floor(start + size + 0.5), 0), limit)
    if high <= low:  # thinner than a pixel once rounded: the pixel under its centre
        centre = min(max(math.floor(start + size / 2), 0), limit - 1)
        return centre, centre + 1
    return low, high


def box_pixels(box: Sequence[float], height: int, width: int
               ) -> tuple[int, int, int, int] | None:
    """The pixels x0 <= x < x1, y0 <= y < y1 of a COCO ``box`` [x, y, w, h], edges rounded
    and clipped to the ``height`` x ``width`` image; None for a box with a non-finite value,
    no area, or nothing inside the image."""
    x, y, w, h = (float(v) for v in box)
    if not (math.isfinite(x + y + w + h) and w > 0 and h > 0):
        return None
    if x >= width or y >= height or x + w <= 0 or y + h <= 0:
        return None
    (x0, x1), (y0, y1) = _span(x, w, width), _span(y, h, height)
    return x0, y0, x1, y1


def _pixel_boxes(boxes: np.ndarray, height: int, width: int) -> list[tuple[int, int, int, int]]:
    found = []
    for index, box in enumerate(boxes):
        pixels = box_pixels(box, height, width)
        if pixels is None:
            raise ValueError(f"box {index} {[float(v) for v in box]} has no area inside the "
                             f"{width}x{height} image")
        found.append(pixels)
    return found


# --- one box -------------------------------------------------------------------------------------

def main_components(mask: np.ndarray) -> np.ndarray:
    """bool ``mask`` [h, w] keeping its largest 8-connected component and those at least
    `COMPONENT_SHARE` of its area."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8),
                                                               connectivity=8)
    if count <= 2:
        return mask.astype(bool)
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = np.flatnonzero(areas >= COMPONENT_SHARE * areas.max()) + 1
    return np.isin(labels, keep)


def _grabcut_seed(shape: tuple[int, int], inner: tuple[int, int, int, int]) -> np.ndarray:
    """GrabCut mask uint8 ``shape``: certain background around ``inner`` (x0, y0, x1, y1 in
    the crop), probable foreground inside it."""
    seed = np.full(shape, cv2.GC_BGD, np.uint8)
    x0, y0, x1, y1 = inner
    seed[y0:y1, x0:x1] = cv2.GC_PR_FGD
    return seed


def grabcut_in_box(image: np.ndarray, pixels: tuple[int, int, int, int],
                   config: PseudoMaskConfig) -> np.ndarray | None:
    """bool [y1 - y0, x1 - x0]: GrabCut's foreground inside the box ``pixels`` of ``image``
    uint8 [H, W, 3] RGB (main components only); None when GrabCut fails."""
    height, width = image.shape[:2]
    x0, y0, x1, y1 = pixels
    margin = config.grabcut_margin
    cx0, cy0 = max(0, x0 - margin), max(0, y0 - margin)
    cx1, cy1 = min(width, x1 + margin), min(height, y1 + margin)
    crop = image[cy0:cy1, cx0:cx1]
    seed = _grabcut_seed(crop.shape[:2], (x0 - cx0, y0 - cy0, x1 - cx0, y1 - cy0))
    scale = min(1.0, GRABCUT_MAX_SIDE / max(crop.shape[:2]))
    if scale < 1:
        size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))
        crop = cv2.resize(crop, size, interpolation=cv2.INTER_AREA)
        seed = cv2.resize(seed, size, interpolation=cv2.INTER_NEAREST)
    if not (seed == cv2.GC_BGD).any():
        # the box fills its crop (it covers the image, or margin 0): GrabCut still needs
        # background samples, and objects rarely touch their box all round
        for edge in (seed[0], seed[-1], seed[:, 0], seed[:, -1]):
            edge[:] = cv2.GC_PR_BGD
    background, foreground = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(int(config.seed))  # GrabCut starts its colour models with kmeans++
    try:
        cv2.grabCut(np.ascontiguousarray(crop[..., ::-1]), seed, None, background, foreground,
                    int(config.grabcut_iterations), cv2.GC_INIT_WITH_MASK)
    except cv2.error as exc:  # too few samples for a colour model (tiny or uniform boxes)
        logger.debug("GrabCut failed on box %s: %s", pixels, str(exc).strip()[-200:])
        return None
    found = np.isin(seed, (cv2.GC_FGD, cv2.GC_PR_FGD)).astype(np.uint8) * 255
    if scale < 1:
        found = cv2.resize(found, (cx1 - cx0, cy1 - cy0), interpolation=cv2.INTER_LINEAR)
    inside = found[y0 - cy0:y1 - cy0, x0 - cx0:x1 - cx0] >= 128
    return main_components(inside)


def _fill_problem(mask: np.ndarray | None, config: PseudoMaskConfig, empty: str) -> str | None:
    """The fallback reason of a pseudo-mask ``mask`` bool [h, w] of its box, None if fine."""
    share = 0.0 if mask is None or mask.size == 0 else float(mask.mean())
    if share == 0.0:
        return empty
    if share < config.min_fill:
        return "too_small_in_box"
    if share > config.max_fill:
        return "too_large_in_box"
    return None


def _checked(mask: np.ndarray | None, method: str, config: PseudoMaskConfig,
             empty: str, shape: tuple[int, int]) -> tuple[np.ndarray, str, str | None]:
    reason = _fill_problem(mask, config, empty)
    if reason is None:
        return mask, method, None
    return np.ones(shape, dtype=bool), "box", reason


def _box_masks(image: np.ndarray, pixel_boxes: list[tuple[int, int, int, int]],
               config: PseudoMaskConfig, sam=None
               ) -> Iterator[tuple[np.ndarray, str, str | None]]:
    """Per box: (bool mask of the box's own pixels [y1 - y0, x1 - x0], source, fallback)."""
    shapes = [(y1 - y0, x1 - x0) for x0, y0, x1, y1 in pixel_boxes]
    if config.method == "box":
        for shape in shapes:
            yield np.ones(shape, dtype=bool), "box", None
    elif config.method == "grabcut":
        for pixels, shape in zip(pixel_boxes, shapes):
            yield _checked(grabcut_in_box(image, pixels, config), "grabcut", config,
                           "grabcut_collapsed", shape)
    else:
        sam = sam if sam is not None else cached_sam(config.sam_checkpoint,
                                                     config.sam_model_type)
        found, _ = sam.boxes(image, np.asarray(pixel_boxes, dtype=np.float32).reshape(-1, 4))
        for (x0, y0, x1, y1), shape, mask in zip(pixel_boxes, shapes, found):
            inside = main_components(mask[y0:y1, x0:x1])
            yield _checked(inside, "sam", config, "sam_failed", shape)


@functools.lru_cache(maxsize=1)
def cached_sam(checkpoint: str, model_type: str):
    """`predict.sam.load_sam` of ``checkpoint``, loaded once per process (device auto)."""
    from instseg_pipeline.predict.sam import load_sam

    return load_sam(checkpoint, model_type)


def _check_image(image: np.ndarray) -> None:
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
            and image.shape[2] == 3):
        raise ValueError(f"image must be uint8 [H, W, 3] RGB, got "
                         f"{getattr(image, 'dtype', type(image))} "
                         f"{list(getattr(image, 'shape', []))}")


def pseudo_masks_for_image(image: np.ndarray, boxes: np.ndarray, config: PseudoMaskConfig,
                           sam=None) -> PseudoMasks:
    """Pseudo-masks of ``boxes`` float [N, 4] (COCO x, y, w, h) on ``image`` uint8 [H, W, 3]
    RGB by ``config.method``: `PseudoMasks` with masks bool [N, H, W].

    ``sam``: a `predict.sam.SamSegmenter` for method ``sam`` (default: the checkpoint of
    ``config``, loaded once per process). A box with nothing inside the image raises
    ValueError naming its index.
    """
    _check_image(image)
    height, width = image.shape[:2]
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    pixel_boxes = _pixel_boxes(boxes, height, width)
    result = np.zeros((len(boxes), height, width), dtype=bool)
    sources, fallbacks = [], []
    for index, (mask, source, reason) in enumerate(_box_masks(image, pixel_boxes, config, sam)):
        x0, y0, x1, y1 = pixel_boxes[index]
        result[index, y0:y1, x0:x1] = mask
        sources.append(source)
        fallbacks.append(reason)
    return PseudoMasks(result, sources, fallbacks)


# --- many images ----------------------------------------------------------------------------

def encode_for_image(image: np.ndarray, boxes: np.ndarray, config: PseudoMaskConfig,
                     sam=None) -> EncodedPseudoMasks:
    """`pseudo_masks_for_image` as RLE strings, holding one full-size mask at a time."""
    _check_image(image)
    height, width = image.shape[:2]
    pixel_boxes = _pixel_boxes(np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
                               height, width)
    encoded = EncodedPseudoMasks([], [], [], [])
    full = np.zeros((height, width), dtype=np.uint8)
    for (x0, y0, x1, y1), (mask, source, reason) in zip(
            pixel_boxes, _box_masks(image, pixel_boxes, config, sam)):
        full[y0:y1, x0:x1] = mask
        encoded.rles.append(mask_codec.rle_to_string(mask_codec.bitmap_to_rle(full)))
        encoded.areas.append(int(mask.sum()))
        encoded.sources.append(source)
        encoded.fallbacks.append(reason)
        full[y0:y1, x0:x1] = 0
    return encoded


def _run_job(job: tuple, config: PseudoMaskConfig, sam=None) -> EncodedPseudoMasks:
    path, boxes, *size = job
    image, _mode = load_image(path, size[0] if size else None)
    return encode_for_image(image, boxes, config, sam)


def worker_count(config: PseudoMaskConfig, jobs: int) -> int:
    """Processes `generate` starts for ``jobs`` images: 0 (in this process) for ``sam``
    and single jobs, else ``workers`` (null: one per CPU), at most one per job."""
    if config.method == "sam" or jobs < 2:
        return 0
    workers = (os.cpu_count() or 1) if config.workers is None else config.workers
    return min(workers, jobs)


def count_results(results: Sequence[EncodedPseudoMasks]) -> dict:
    """``{"images", "masks", "sources": {source: n}, "fallbacks": {reason: n}}``."""
    sources = Counter(s for r in results for s in r.sources)
    fallbacks = Counter(f for r in results for f in r.fallbacks if f is not None)
    return {"images": len(results), "masks": int(sum(sources.values())),
            "sources": dict(sorted(sources.items())), "fallbacks": dict(sorted(fallbacks.items()))}


def generate(jobs: Sequence[tuple], config: PseudoMaskConfig, progress: bool = True
             ) -> tuple[list[EncodedPseudoMasks], dict]:
    """Pseudo-masks of many images: ``jobs`` are (image path, boxes float [N, 4] COCO
    x, y, w, h) or (path, boxes, (width, height)) when the annotated size is known (EXIF
    policy of `data.images.load_image`). Returns the `EncodedPseudoMasks` in job order and
    `count_results`; a progress bar (or log lines) unless ``progress`` is False.

    Runs in `worker_count` processes (fork: they share the imported modules).
    """
    jobs = list(jobs)
    workers = worker_count(config, len(jobs))
    threads = cv2.getNumThreads()
    if workers < 1:
        sam = cached_sam(config.sam_checkpoint, config.sam_model_type) \
            if config.method == "sam" and jobs else None
        done = (_run_job(job, config, sam) for job in jobs)
        pool = None
    else:
        # one OpenCV thread per worker process (one process per CPU already), set here before
        # the fork: in a forked child, changing the thread count of a pool the parent had
        # started can wait forever
        cv2.setNumThreads(1)
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
        done = pool.map(functools.partial(_run_job, config=config), jobs,
                        chunksize=max(1, len(jobs) // (workers * 8)))
    try:
        results = list(progress_bar(done, total=len(jobs), desc=f"pseudo-masks ({config.method})",
                                    unit="img", disable=not progress, logger=logger))
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
            cv2.setNumThreads(threads)
    counts = count_results(results)
    logger.info("pseudo-masks (%s) of %d boxes in %d images: %s; fallbacks %s", config.method,
                counts["masks"], counts["images"], counts["sources"], counts["fallbacks"] or 0)
    return results, counts


# --- simulated box-only data ------------------------------------------------------------------

def choose_images(image_ids: Sequence[int], fraction: float, seed: int) -> set[int]:
    """A seeded choice of ``fraction`` of ``image_ids`` (rounded, at least one when the
    fraction is positive); the same ids and seed give the same choice."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    ids = sorted(int(i) for i in image_ids)
    count = min(len(ids), math.floor(fraction * len(ids) + 0.5))
    if fraction > 0 and ids:
        count = max(count, 1)
    chosen = np.random.default_rng(seed).choice(len(ids), size=count, replace=False)
    return {ids[i] for i in chosen}


def replace_with_pseudo_masks(images: pd.DataFrame, instances: pd.DataFrame, root: str,
                              fraction: float, config: PseudoMaskConfig
                              ) -> tuple[pd.DataFrame, dict]:
    """Simulated box-only data: the annotated, non-crowd instances of ``fraction`` of the
    train images (`choose_images` with ``config.seed``) get the pseudo-mask of their bbox.

    images / instances: the canonical tables (file names relative to ``root``). Returns
    (instances with ``rle``, ``area`` and ``mask_source`` replaced on those rows, counts:
    ``fraction``, ``train_images``, ``images`` chosen, ``instances`` replaced,
    ``sources``, ``fallbacks``). Crowd regions and other splits keep their masks;
    ``fraction`` 0 returns ``instances`` itself.
    """
    import pandas as pd

    from instseg_pipeline.data.tables import ANNOTATED, with_mask_source

    train = images[images["split"] == "train"]
    chosen = choose_images(train["image_id"].tolist(), fraction, config.seed)
    counts = {"fraction": float(fraction), "train_images": len(train), "images": len(chosen),
              "instances": 0, "sources": {}, "fallbacks": {}}
    if not chosen:
        return instances, counts
    table = with_mask_source(instances).reset_index(drop=True)
    replace = (table["image_id"].isin(chosen) & ~table["iscrowd"].astype(bool)
               & (table["mask_source"] == ANNOTATED)).to_numpy()
    rows = np.flatnonzero(replace)
    by_image = {int(k): v for k, v in
                table.iloc[rows].groupby("image_id", sort=True).indices.items()}
    records = train.set_index("image_id")
    bboxes = table["bbox"].tolist()
    jobs = [(Path(root) / str(records.at[image_id, "file_name"]),
             np.asarray([bboxes[rows[i]] for i in positions], np.float64).reshape(-1, 4),
             (int(records.at[image_id, "width"]), int(records.at[image_id, "height"])))
            for image_id, positions in by_image.items()]
    results, generated = generate(jobs, config)
    rle, area, source = (table[c].tolist() for c in ("rle", "area", "mask_source"))
    for positions, result in zip(by_image.values(), results):
        for i, counts_, pixels, made_by in zip(positions, result.rles, result.areas,
                                                result.sources):
            rle[rows[i]], area[rows[i]], source[rows[i]] = counts_, pixels, made_by
    table = table.assign(rle=pd.Series(rle, dtype="string"), area=pd.Series(area, dtype="int64"),
                         mask_source=pd.Series(source, dtype="string"))
    table.index = instances.index
    counts.update(instances=generated["masks"], sources=generated["sources"],
                  fallbacks=generated["fallbacks"])
    return table, counts
