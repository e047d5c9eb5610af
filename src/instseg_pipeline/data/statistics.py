"""Dataset statistics: per-class counts, COCO size buckets, crowd, instances per image."""
from __future__ import annotations

import pandas as pd

# COCO's area thresholds for small / medium / large objects.
SMALL_AREA = 32**2
LARGE_AREA = 96**2


def _size_bucket(area: pd.Series) -> pd.Series:
    return pd.cut(area, [-1, SMALL_AREA - 1, LARGE_AREA - 1, float("inf")],
                  labels=["small", "medium", "large"]).astype(str)


def dataset_statistics(images: pd.DataFrame, instances: pd.DataFrame,
                       categories: pd.DataFrame) -> dict:
    """Counts per split: instances per class and size bucket, crowd, instances per image."""
    names = dict(zip(categories["category_id"], categories["name"]))
    merged = instances.merge(images[["image_id", "split"]], on="image_id")
    merged["size"] = _size_bucket(merged["area"])
    merged["class"] = merged["category_id"].map(names)
    stats = {}
    for split, group in images.groupby("split"):
        inst = merged[merged["split"] == split]
        things = inst[~inst["iscrowd"]]
        per_image = things.groupby("image_id").size().reindex(group["image_id"], fill_value=0)
        stats[str(split)] = {
            "images": len(group),
            "instances": len(things),
            "crowd_regions": int(inst["iscrowd"].sum()),
            "per_class": {str(k): int(v) for k, v in things["class"].value_counts().items()},
            "crowd_per_class": {str(k): int(v) for k, v in
                                inst[inst["iscrowd"]]["class"].value_counts().items()},
            "size_buckets": {b: int((things["size"] == b).sum())
                             for b in ("small", "medium", "large")},
            "images_per_instance_count": {str(int(k)): int(v) for k, v in
                                          per_image.value_counts().sort_index().items()},
        }
    return stats


def plot_statistics(stats: dict, max_classes: int = 30):
    """Instances per class (the ``max_classes`` most frequent), size buckets and instances
    per image, one colour per split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = sorted(stats)
    totals: dict[str, int] = {}
    for split in splits:
        for name, count in stats[split]["per_class"].items():
            totals[name] = totals.get(name, 0) + count
    classes = sorted(totals, key=lambda c: (-totals[c], c))[:max_classes]
    fig = plt.figure(figsize=(14, max(5.0, 0.22 * len(classes) + 1.5)), layout="constrained")
    grid = fig.add_gridspec(2, 2, width_ratios=[1, 1.3])
    by_class = fig.add_subplot(grid[:, 0])
    _grouped_bars(by_class, splits, classes[::-1], [stats[s]["per_class"] for s in splits],
                  horizontal=True)
    shown = f" (top {max_classes} of {len(totals)})" if len(totals) > max_classes else ""
    by_class.set_title(f"instances per class{shown}")
    sizes = fig.add_subplot(grid[0, 1])
    _grouped_bars(sizes, splits, ["small", "medium", "large"],
                  [stats[s]["size_buckets"] for s in splits])
    sizes.set_title("COCO size buckets (area < 32², < 96², ≥ 96²)")
    counts = sorted({int(k) for s in stats.values() for k in s["images_per_instance_count"]})
    per_image = fig.add_subplot(grid[1, 1])
    _grouped_bars(per_image, splits, [str(c) for c in counts],
                  [stats[s]["images_per_instance_count"] for s in splits])
    per_image.set_title("images by number of instances")
    per_image.set_xlabel("instances in the image")
    return fig


def _grouped_bars(ax, splits: list[str], keys: list[str], values: list[dict],
                  horizontal: bool = False) -> None:
    width = 0.8 / max(len(splits), 1)
    draw = ax.barh if horizontal else ax.bar
    for offset, (split, counts) in enumerate(zip(splits, values)):
        positions = [i + offset * width for i in range(len(keys))]
        draw(positions, [counts.get(k, 0) for k in keys], width, label=split)
    ticks = [i + 0.4 - width / 2 for i in range(len(keys))]
    if horizontal:
        ax.set_yticks(ticks, keys)
        ax.set_xlabel("count")
    else:
        ax.set_xticks(ticks, keys, rotation=45 if len(keys) > 12 else 0)
        ax.set_ylabel("count")
    ax.legend()
