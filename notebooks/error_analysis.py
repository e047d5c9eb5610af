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
# # Error analysis
#
# Which images the model gets most wrong, and which predictions and ground-truth
# instances are the errors. It reads the evaluation outputs (`predictions`,
# `matched_mask_ious`) of the latest `kedro run --pipelines evaluation`. The matching is
# class-agnostic at mask IoU ≥ 0.5 among predictions with score ≥
# `evaluation.match_score_threshold`: a matched pair of two classes is a confusion, not
# a false positive; predictions inside crowd regions are ignored, as COCO does.

# %%
# %load_ext kedro.ipython

# %%
import logging
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from instseg_pipeline.data.images import load_image
from instseg_pipeline.data.masks import decode_strings
from instseg_pipeline.evaluation.errors import false_negatives, false_positives
from instseg_pipeline.viz.overlays import overlay_masks

logger = logging.getLogger("instseg_pipeline.notebooks.error_analysis")
WORST = 4      # images shown side by side
TABLE_ROWS = 20

# %%
images = catalog.load("images")
instances = catalog.load("instances")
categories = catalog.load("categories")
predictions = catalog.load("predictions")
matches = catalog.load("matched_mask_ious")
evaluation = catalog.load("params:evaluation")
threshold = float(evaluation["match_score_threshold"])  # the one the matches used
evaluated = images[images["split"] == evaluation["split"]]
names = dict(zip(categories["category_id"], categories["name"]))
logger.info("%s split: %d images, %d predictions, %d matched pairs (score >= %g)",
            evaluation["split"], len(evaluated), len(predictions), len(matches), threshold)

# %% [markdown]
# ## Per-image quality
#
# `mean_matched_iou` is the mean mask IoU of the image's matched pairs (from
# `matched_mask_ious`). Images are ranked by `image_pq`, the panoptic quality of the
# image alone: sum of matched IoUs / (matched + ½ false positives + ½ missed), so an
# image whose objects were all missed ranks below one with loose masks. Images with
# neither ground truth nor confident predictions have nothing to get wrong and are left
# out.

# %%
fp = false_positives(predictions[predictions["image_id"].isin(evaluated["image_id"])],
                     matches, threshold, instances)
fn = false_negatives(instances, matches, evaluated)
gt = instances[instances["image_id"].isin(evaluated["image_id"])
               & ~instances["iscrowd"].astype(bool)]
by_image = matches.groupby("image_id")["iou"]
per_image = pd.DataFrame({
    "ground_truth": gt.groupby("image_id").size(),
    "matched": by_image.size(),
    "wrong_class": (matches["pred_category_id"] != matches["gt_category_id"])
    .groupby(matches["image_id"]).sum(),
    "false_positives": fp.groupby("image_id").size(),
    "missed": fn.groupby("image_id").size(),
}).reindex(evaluated["image_id"]).fillna(0).astype(int)
per_image["mean_matched_iou"] = by_image.mean()
errors = per_image["matched"] + 0.5 * (per_image["false_positives"] + per_image["missed"])
per_image["image_pq"] = by_image.sum().reindex(per_image.index).fillna(0.0) \
    / errors.where(errors > 0)
ranked = per_image.dropna(subset=["image_pq"]).sort_values(
    ["image_pq", "mean_matched_iou"], na_position="first")
logger.info("mean image_pq %.3f over %d images", ranked["image_pq"].mean(), len(ranked))
ranked.head(TABLE_ROWS)

# %% [markdown]
# ## The worst images
#
# Left: predictions with score ≥ the matching threshold; right: ground truth (crowd
# regions left out).

# %%
# relative roots (the catalog's defaults) are relative to the project, not to notebooks/
root = Path(catalog.load("params:source")["root"])
root = root if root.is_absolute() else context.project_path / root


# %%
def draw_masks(ax, row, frame: pd.DataFrame, title: str) -> None:
    """The image of `row` (an `images` row) with the masks of `frame` tinted."""
    height, width = int(row["height"]), int(row["width"])
    picture, _ = load_image(root / row["file_name"], (width, height))
    masks = decode_strings(frame["rle"].tolist(), height, width)
    ax.imshow(overlay_masks(picture / 255.0, masks).clip(0, 1))
    ax.set_title(title, fontsize=9)
    ax.axis("off")


worst = ranked.head(WORST)
rows_by_id = evaluated.set_index("image_id", drop=False)
if len(worst):
    fig, axes = plt.subplots(len(worst), 2, figsize=(8, 4 * len(worst)), squeeze=False)
    for (left, right), (image_id, score) in zip(axes, worst.iterrows()):
        mine = predictions[(predictions["image_id"] == image_id)
                           & (predictions["score"] >= threshold)]
        draw_masks(left, rows_by_id.loc[image_id], mine,
                   f"image {image_id}: {len(mine)} predictions, image PQ "
                   f"{score['image_pq']:.2f}, {int(score['false_positives'])} FP")
        draw_masks(right, rows_by_id.loc[image_id], gt[gt["image_id"] == image_id],
                   f"ground truth: {int(score['ground_truth'])} instances, "
                   f"{int(score['missed'])} missed")
    fig.tight_layout()
    plt.show()
else:
    logger.warning("no %s image has ground truth or predictions with score >= %g",
                   evaluation["split"], threshold)

# %% [markdown]
# ## False positives: confident predictions matched to no ground truth

# %%
fp_table = fp.assign(**{"class": fp["category_id"].map(names)})[
    ["prediction_id", "image_id", "class", "score", "area"]]
logger.info("%d false positives with score >= %g", len(fp_table), threshold)
fp_table.head(TABLE_ROWS)

# %% [markdown]
# ## Missed ground truth (false negatives), largest first

# %%
fn_table = fn.assign(**{"class": fn["category_id"].map(names)})[
    ["instance_id", "image_id", "class", "area"]]
logger.info("%d of %d ground-truth instances missed", len(fn_table), len(gt))
fn_table.head(TABLE_ROWS)

# %% [markdown]
# ## Errors per class

# %%
confused = matches[matches["pred_category_id"] != matches["gt_category_id"]]
per_class = pd.DataFrame({
    "ground truth": gt["category_id"].map(names).value_counts(),
    "false positives": fp["category_id"].map(names).value_counts(),
    "missed": fn["category_id"].map(names).value_counts(),
    "predicted as another class": confused["gt_category_id"].map(names).value_counts(),
}).reindex(categories["name"]).fillna(0).astype(int)
per_class
