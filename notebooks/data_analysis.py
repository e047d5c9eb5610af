# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: -all
#     formats: ipynb,py:percent
#     notebook_metadata_filter: kernelspec,-jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Data analysis
#
# The canonical tables (`images`, `instances`, `categories`) and the ingestion reports,
# read from the Kedro catalog: run `kedro run --pipelines ingestion` first. Open the
# notebook from the project folder or from `notebooks/`; `%reload_kedro --env coco`
# switches to another source.

# %%
# %load_ext kedro.ipython

# %%
import logging
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from instseg_pipeline.data.images import load_image
from instseg_pipeline.data.masks import decode_strings
from instseg_pipeline.data.statistics import LARGE_AREA, SMALL_AREA
from instseg_pipeline.viz.overlays import overlay_masks

# under the package logger, which Kedro sets to INFO
logger = logging.getLogger("instseg_pipeline.notebooks.data_analysis")
SAMPLES = 6  # images in the overlay gallery

# %%
images = catalog.load("images")
instances = catalog.load("instances")
categories = catalog.load("categories")
stats = catalog.load("dataset_statistics")
quality = catalog.load("data_quality_report")
names = dict(zip(categories["category_id"], categories["name"]))
crowd = instances["iscrowd"].astype(bool)
logger.info("%d images, %d instances (%d crowd regions), %d categories",
            len(images), len(instances), int(crowd.sum()), len(categories))

# %% [markdown]
# ## Split sizes and what ingestion dropped

# %%
splits = pd.DataFrame({split: {"images": s["images"], "instances": s["instances"],
                               "crowd regions": s["crowd_regions"]}
                       for split, s in stats.items()}).T
splits.loc["total"] = splits.sum()
splits

# %%
dropped = pd.DataFrame([{"kind": kind, "reason": reason, "count": count}
                        for kind, reasons in quality["dropped"].items()
                        for reason, count in reasons.items()],
                       columns=["kind", "reason", "count"])
logger.info("ingestion kept %d images (%d without instances); dropped %s",
            quality["images"], quality["images_without_instances"],
            quality["dropped_total"])
dropped

# %% [markdown]
# ## Instances per class (crowd regions counted apart)

# %%
per_class = pd.DataFrame({split: s["per_class"] for split, s in stats.items()})
per_class = per_class.reindex(categories["name"]).fillna(0).astype(int)
per_class["total"] = per_class.sum(axis=1)
crowd_per_class = pd.DataFrame({split: s["crowd_per_class"] for split, s in stats.items()})
per_class["crowd"] = crowd_per_class.sum(axis=1).reindex(per_class.index).fillna(0)
per_class.astype(int).sort_values("total", ascending=False)

# %% [markdown]
# ## COCO size buckets (small < 32², medium < 96², large ≥ 96² pixels)

# %%
buckets = pd.DataFrame({split: s["size_buckets"] for split, s in stats.items()})
buckets["share"] = (buckets.sum(axis=1) / max(buckets.to_numpy().sum(), 1)).round(3)
buckets

# %% [markdown]
# ## Instance areas

# %%
things = instances[~crowd].merge(images[["image_id", "split"]], on="image_id")
low, high = (things["area"].min(), things["area"].max()) if len(things) else (1, 2)
bins = np.logspace(np.log10(max(low, 1)) - 0.05, np.log10(max(high, 2)) + 0.05, 40)
fig, ax = plt.subplots(figsize=(8, 4))
for split, group in things.groupby("split"):
    ax.hist(group["area"], bins=bins, alpha=0.6, label=f"{split} ({len(group)})")
for limit in (SMALL_AREA, LARGE_AREA):
    ax.axvline(limit, color="black", linestyle="--", linewidth=1)
ax.set(xscale="log", xlabel="instance area (pixels)", ylabel="instances",
       title="instance areas (dashed: COCO small / medium / large limits)")
ax.legend()
plt.show()

# %% [markdown]
# ## Sample overlays
#
# Masks decoded from the `rle` column, one colour per instance; crowd regions are
# included (titles count them).

# %%
# relative roots (the catalog's defaults) are relative to the project, not to notebooks/
root = Path(catalog.load("params:source")["root"])
root = root if root.is_absolute() else context.project_path / root


# %%
def draw_image(ax, row) -> None:
    """One image of the `images` table with its instance masks tinted."""
    height, width = int(row["height"]), int(row["width"])
    picture, _ = load_image(root / row["file_name"], (width, height))
    mine = instances[instances["image_id"] == row["image_id"]]
    masks = decode_strings(mine["rle"].tolist(), height, width)
    ax.imshow(overlay_masks(picture / 255.0, masks).clip(0, 1))
    labels = ", ".join(sorted({names[c] for c in mine["category_id"]}))
    ax.set_title(f"image {row['image_id']} ({row['split']}): {len(mine)} instances, "
                 f"{int(mine['iscrowd'].sum())} crowd\n{labels}", fontsize=8)
    ax.axis("off")


sample = images.sample(min(SAMPLES, len(images)), random_state=0)
columns = min(3, max(len(sample), 1))
rows = max(1, -(-len(sample) // columns))
fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 4 * rows), squeeze=False)
for ax, (_, row) in zip(axes.ravel(), sample.iterrows()):
    draw_image(ax, row)
for ax in axes.ravel()[len(sample):]:
    ax.axis("off")
fig.tight_layout()
plt.show()
