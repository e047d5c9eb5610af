"""How close pseudo-masks made from boxes come to the annotated masks (Kedro-free).

`sample_instances` draws annotated, non-crowd instances (both splits), `pseudo_mask_ious`
makes each method's pseudo-mask from every sampled box (`data.pseudo_masks.generate`,
worker processes and a progress bar) and scores it by IoU against the annotated mask,
`summarize` reduces that to per-method numbers (overall, per category, per COCO size, the
fallbacks by reason), `quality_table` and `quality_plot` show them. The
``pseudo_mask_quality`` node of the ``weak_supervision`` pipeline chains them.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from instseg_pipeline.data.statistics import LARGE_AREA, SMALL_AREA
from instseg_pipeline.data.tables import with_mask_source

logger = logging.getLogger(__name__)

SIZES = ("small", "medium", "large")  # COCO's area ranges: < 32^2, < 96^2, the rest
RECORD_COLUMNS = ["method", "annotation_id", "image_id", "category_id", "size", "iou",
                  "source", "fallback"]


def mask_sources(instances: pd.DataFrame) -> pd.Series:
    """The ``mask_source`` of each row as str (``annotated`` for tables written without
    it, `data.tables.with_mask_source`)."""
    return with_mask_source(instances)["mask_source"].astype(str)


def size_of(area: float) -> str:
    """COCO size bucket of a mask area in pixels: small, medium or large."""
    return "small" if area < SMALL_AREA else "medium" if area < LARGE_AREA else "large"


def sample_instances(images: pd.DataFrame, instances: pd.DataFrame,
                     max_instances: int | None, seed: int) -> pd.DataFrame:
    """Annotated, non-crowd instances of the images table's images (every split), at most
    ``max_instances`` of them drawn with ``seed`` (None: all); sorted by image and instance.

    Raises ValueError when no instance qualifies (the measure needs annotated masks)."""
    pool = instances[~instances["iscrowd"].astype(bool)
                     & (mask_sources(instances) == "annotated")
                     & instances["image_id"].isin(images["image_id"])]
    if pool.empty:
        found = mask_sources(instances).value_counts().to_dict()
        raise ValueError("pseudo-mask quality needs annotated (non-crowd) instance masks to "
                         f"compare against; the instances table has none (mask_source "
                         f"counts: {found or 'no rows'}). Run it on a source with masks "
                         "and ingestion.box_only.fraction 0")
    if max_instances is not None and len(pool) > max_instances:
        pool = pool.sample(n=max_instances, random_state=seed)
    return pool.sort_values(["image_id", "instance_id"])


def _jobs(images: pd.DataFrame, sample: pd.DataFrame, root: str | Path) -> tuple[list, list]:
    """`data.pseudo_masks.generate` jobs, (image path, boxes float [N, 4] COCO xywh,
    (width, height)), per sampled image, and (image id, images row, its sampled instances)
    in the same order."""
    by_id = images.set_index("image_id")
    jobs, groups = [], []
    for image_id, rows in sample.groupby("image_id", sort=True):
        image = by_id.loc[image_id]
        boxes = np.asarray(rows["bbox"].tolist(), dtype=np.float64).reshape(-1, 4)
        jobs.append((Path(root) / str(image["file_name"]), boxes,
                     (int(image["width"]), int(image["height"]))))
        groups.append((int(image_id), image, rows))
    return jobs, groups


def mask_ious(masks: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """float [N] IoU of ``masks[i]`` with ``truth[i]`` (both bool [N, H, W]); 0 where both
    are empty."""
    masks, truth = masks.reshape(len(masks), -1), truth.reshape(len(truth), -1)
    inter = np.logical_and(masks, truth).sum(axis=1)
    union = np.logical_or(masks, truth).sum(axis=1)
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def pseudo_mask_ious(images: pd.DataFrame, sample: pd.DataFrame, root: str | Path,
                     configs: Mapping[str, object], progress: bool = True) -> pd.DataFrame:
    """One row per (method, sampled instance): `RECORD_COLUMNS`, the IoU of the method's
    pseudo-mask from the instance's box against its annotated mask, what the box ended as
    (``source``) and the fallback reason (None when there was none).

    ``configs``: method name -> `data.pseudo_masks.PseudoMaskConfig`. An image whose file
    is not of its annotated size fails in `data.images.load_image`, naming the file."""
    from instseg_pipeline.data.masks import decode_strings
    from instseg_pipeline.data.pseudo_masks import generate

    jobs, groups = _jobs(images, sample, root)
    records = []
    for method, config in configs.items():
        logger.info("pseudo-mask quality: %s masks for %d instances of %d images", method,
                    len(sample), len(jobs))
        results, _ = generate(jobs, config, progress=progress)
        for (image_id, image, rows), result in zip(groups, results):
            height, width = int(image["height"]), int(image["width"])
            ious = mask_ious(decode_strings(result.rles, height, width).astype(bool),
                             decode_strings(rows["rle"].tolist(), height, width).astype(bool))
            for row, iou, source, fallback in zip(rows.itertuples(), ious, result.sources,
                                                  result.fallbacks):
                records.append((method, int(row.annotation_id), image_id,
                                int(row.category_id), size_of(row.area), float(iou),
                                str(source), fallback))
    return pd.DataFrame(records, columns=RECORD_COLUMNS)


def _stats(ious: pd.Series) -> dict:
    """``{"n", "mean_iou", "median_iou"}`` (None for an empty group: JSON has no NaN)."""
    if ious.empty:
        return {"n": 0, "mean_iou": None, "median_iou": None}
    return {"n": len(ious), "mean_iou": float(ious.mean()),
            "median_iou": float(ious.median())}


def summarize(records: pd.DataFrame, categories: pd.DataFrame) -> dict:
    """Per method: n, mean and median IoU, what the boxes ended as (``sources``), the
    fallbacks by reason, and the same statistics ``by_size`` (every COCO bucket, empty
    ones with n 0) and ``by_category`` (by category name)."""
    names = dict(zip(categories["category_id"].astype(int), categories["name"].astype(str)))
    methods = {}
    for method, group in records.groupby("method", sort=False):
        fallbacks = group["fallback"].dropna().astype(str).value_counts()
        methods[str(method)] = {
            **_stats(group["iou"]),
            "sources": {str(k): int(v) for k, v in group["source"].value_counts().items()},
            "fallbacks": {str(k): int(v) for k, v in sorted(fallbacks.items())},
            "by_size": {size: _stats(group.loc[group["size"] == size, "iou"])
                        for size in SIZES},
            "by_category": {
                names.get(int(cat), str(cat)): _stats(rows["iou"])
                for cat, rows in group.groupby("category_id", sort=True)},
        }
    return methods


def quality_report(images: pd.DataFrame, instances: pd.DataFrame,
                   categories: pd.DataFrame, root: str | Path, configs: Mapping[str, object],
                   max_instances: int | None, seed: int, progress: bool = True) -> dict:
    """The ``pseudo_mask_quality`` report: ``{"instances", "images", "max_instances",
    "seed", "methods": summarize(...)}`` over a seeded sample of annotated instances."""
    sample = sample_instances(images, instances, max_instances, seed)
    records = pseudo_mask_ious(images, sample, root, configs, progress=progress)
    return {"instances": len(sample), "images": int(sample["image_id"].nunique()),
            "max_instances": max_instances, "seed": seed,
            "methods": summarize(records, categories)}


def _cell(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def quality_table(report: Mapping) -> str:
    """A markdown table: per method n, mean and median IoU, mean IoU per size, fallbacks."""
    lines = ["| method | n | mean IoU | median IoU | small | medium | large | fallbacks |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for method, stats in report["methods"].items():
        sizes = " | ".join(f"{_cell(stats['by_size'][s]['mean_iou'])} "
                           f"({stats['by_size'][s]['n']})" for s in SIZES)
        fallbacks = ", ".join(f"{k} {v}" for k, v in stats["fallbacks"].items()) or "none"
        lines.append(f"| {method} | {stats['n']} | {_cell(stats['mean_iou'])} | "
                     f"{_cell(stats['median_iou'])} | {sizes} | {fallbacks} |")
    return "\n".join(lines)


def quality_plot(report: Mapping):
    """A Figure: mean IoU with the annotated mask, one bar per method in each group (all
    sizes, small, medium, large), n above each bar (matplotlib without pyplot)."""
    from matplotlib.figure import Figure

    groups = ("all", *SIZES)
    methods = list(report["methods"])
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    ax = figure.subplots()
    width = 0.8 / max(len(methods), 1)
    for index, method in enumerate(methods):
        stats = report["methods"][method]
        cells = [stats] + [stats["by_size"][s] for s in SIZES]
        heights = [c["mean_iou"] if c["mean_iou"] is not None else 0.0 for c in cells]
        xs = np.arange(len(groups)) + (index - (len(methods) - 1) / 2) * width
        bars = ax.bar(xs, heights, width, label=method)
        ax.bar_label(bars, labels=[f"n={c['n']}" for c in cells], fontsize=7, padding=2)
    ax.set_xticks(np.arange(len(groups)), groups)
    ax.set_ylim(0.0, 1.1)
    ax.set_ylabel("mean IoU with the annotated mask")
    ax.set_title(f"Pseudo-masks from boxes ({report['instances']} instances, "
                 f"{report['images']} images)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    return figure

