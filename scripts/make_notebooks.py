"""Write the project notebooks (data analysis, model comparison, error analysis) with nbformat.

The notebooks are stored without outputs or execution counts and with fixed cell ids, so
running this script again gives the same bytes: edit the cells here, not in Jupyter.

    python scripts/make_notebooks.py            # rewrites notebooks/*.ipynb
    python scripts/make_notebooks.py --out DIR  # writes them elsewhere (the tests compare)
"""
from __future__ import annotations

import argparse
import logging
import textwrap
from pathlib import Path

import nbformat
from nbformat import v4

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}

LOAD_KEDRO = "%load_ext kedro.ipython"

ROOT_CELL = """\
# relative roots (the catalog's defaults) are relative to the project, not to notebooks/
root = Path(catalog.load("params:source")["root"])
root = root if root.is_absolute() else context.project_path / root"""

DATA_ANALYSIS = [
    ("md", """\
    # Data analysis

    The canonical tables (`images`, `instances`, `categories`) and the ingestion reports,
    read from the Kedro catalog: run `kedro run --pipeline ingestion` first. Open the
    notebook from the project folder or from `notebooks/`; `%reload_kedro --env coco`
    switches to another source."""),
    ("code", LOAD_KEDRO),
    ("code", """\
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
    SAMPLES = 6  # images in the overlay gallery"""),
    ("code", """\
    images = catalog.load("images")
    instances = catalog.load("instances")
    categories = catalog.load("categories")
    stats = catalog.load("dataset_statistics")
    quality = catalog.load("data_quality_report")
    names = dict(zip(categories["category_id"], categories["name"]))
    crowd = instances["iscrowd"].astype(bool)
    logger.info("%d images, %d instances (%d crowd regions), %d categories",
                len(images), len(instances), int(crowd.sum()), len(categories))"""),
    ("md", "## Split sizes and what ingestion dropped"),
    ("code", """\
    splits = pd.DataFrame({split: {"images": s["images"], "instances": s["instances"],
                                   "crowd regions": s["crowd_regions"]}
                           for split, s in stats.items()}).T
    splits.loc["total"] = splits.sum()
    splits"""),
    ("code", """\
    dropped = pd.DataFrame([{"kind": kind, "reason": reason, "count": count}
                            for kind, reasons in quality["dropped"].items()
                            for reason, count in reasons.items()],
                           columns=["kind", "reason", "count"])
    logger.info("ingestion kept %d images (%d without instances); dropped %s",
                quality["images"], quality["images_without_instances"],
                quality["dropped_total"])
    dropped"""),
    ("md", "## Instances per class (crowd regions counted apart)"),
    ("code", """\
    per_class = pd.DataFrame({split: s["per_class"] for split, s in stats.items()})
    per_class = per_class.reindex(categories["name"]).fillna(0).astype(int)
    per_class["total"] = per_class.sum(axis=1)
    crowd_per_class = pd.DataFrame({split: s["crowd_per_class"] for split, s in stats.items()})
    per_class["crowd"] = crowd_per_class.sum(axis=1).reindex(per_class.index).fillna(0)
    per_class.astype(int).sort_values("total", ascending=False)"""),
    ("md", "## COCO size buckets (small < 32², medium < 96², large ≥ 96² pixels)"),
    ("code", """\
    buckets = pd.DataFrame({split: s["size_buckets"] for split, s in stats.items()})
    buckets["share"] = (buckets.sum(axis=1) / max(buckets.to_numpy().sum(), 1)).round(3)
    buckets"""),
    ("md", "## Instance areas"),
    ("code", """\
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
    plt.show()"""),
    ("md", """\
    ## Sample overlays

    Masks decoded from the `rle` column, one colour per instance; crowd regions are
    included (titles count them)."""),
    ("code", ROOT_CELL),
    ("code", """\
    def draw_image(ax, row) -> None:
        \"\"\"One image of the `images` table with its instance masks tinted.\"\"\"
        height, width = int(row["height"]), int(row["width"])
        picture, _ = load_image(root / row["file_name"], (width, height))
        mine = instances[instances["image_id"] == row["image_id"]]
        masks = decode_strings(mine["rle"].tolist(), height, width)
        ax.imshow(overlay_masks(picture / 255.0, masks).clip(0, 1))
        labels = ", ".join(sorted({names[c] for c in mine["category_id"]}))
        ax.set_title(f"image {row['image_id']} ({row['split']}): {len(mine)} instances, "
                     f"{int(mine['iscrowd'].sum())} crowd\\n{labels}", fontsize=8)
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
    plt.show()"""),
]

MODEL_COMPARISON = [
    ("md", """\
    # Model comparison

    Two views of the runs so far: the MLflow runs (one per `kedro run` with tracking on)
    and the Kedro-versioned `coco_metrics` (one version per evaluation run, tracked or
    not)."""),
    ("code", LOAD_KEDRO),
    ("code", """\
    import logging
    from pathlib import Path

    import matplotlib.pyplot as plt
    import mlflow
    import pandas as pd
    from kedro.io import Version
    from kedro_datasets.json import JSONDataset

    logger = logging.getLogger("instseg_pipeline.notebooks.model_comparison")
    SQLITE = "sqlite:///"
    METRICS = ["segm/mAP", "bbox/mAP", "train/loss"]
    AP_KEYS = ["mAP", "mAP_50", "mAP_75"]"""),
    ("md", "## MLflow runs"),
    ("code", """\
    mlflow_conf = context.config_loader["mlflow"]
    tracking_uri = mlflow_conf["server"]["mlflow_tracking_uri"]  # the project's own store
    experiment_name = mlflow_conf["tracking"]["experiment"]["name"]
    logger.info("MLflow store %s, experiment %s", tracking_uri, experiment_name)"""),
    ("code", """\
    def search_runs(uri: str, experiment: str) -> pd.DataFrame:
        \"\"\"The experiment's runs, oldest first; empty when there is no store yet.\"\"\"
        if uri.startswith(SQLITE) and not Path(uri[len(SQLITE):]).exists():
            logger.warning("no MLflow store at %s: run `kedro run` with tracking on", uri)
            return pd.DataFrame()
        mlflow.set_tracking_uri(uri)
        return mlflow.search_runs(experiment_names=[experiment],
                                  order_by=["attributes.start_time ASC"])


    runs = search_runs(tracking_uri, experiment_name)
    columns = {"tags.mlflow.runName": "name", "start_time": "started", "status": "status",
               **{f"metrics.{m}": m for m in METRICS}}
    table = runs.reindex(columns=["run_id", *columns]).rename(columns=columns)
    table["run"] = table["name"].fillna("run") + " " + table["run_id"].astype(str).str[:6]
    table = table.set_index("run").drop(columns="name")
    logger.info("%d MLflow run(s)", len(table))
    table"""),
    ("code", """\
    if table[METRICS].notna().any().any():
        width = max(6.0, 1.1 * len(table) + 2)
        fig, (ap_ax, loss_ax) = plt.subplots(1, 2, figsize=(2 * width, 4))
        table[["segm/mAP", "bbox/mAP"]].plot.bar(ax=ap_ax, rot=20)
        for bars in ap_ax.containers:
            ap_ax.bar_label(bars, fmt="%.3f", fontsize=8)
        best = table[["segm/mAP", "bbox/mAP"]].max().max()
        ap_ax.set_ylim(0, max(0.05, 1.15 * best) if pd.notna(best) else 1.0)
        ap_ax.set(ylabel="mAP", title="mask and box mAP per run (no bar: not evaluated)")
        table[["train/loss"]].plot.bar(ax=loss_ax, rot=20, legend=False, color="tab:gray")
        loss_ax.set(ylabel="loss", title="last training loss per run")
        fig.tight_layout()
        plt.show()
    else:
        logger.warning("no run has logged %s yet", ", ".join(METRICS))"""),
    ("md", """\
    ## Kedro versions of `coco_metrics`

    Every evaluation run saves a new version folder; each is loaded through a versioned
    `JSONDataset`. COCO's -1 ("no ground truth in this range") becomes empty."""),
    ("code", """\
    entry = context.config_loader["catalog"]["coco_metrics"]
    metrics_path = Path(entry["filepath"])
    metrics_path = metrics_path if metrics_path.is_absolute() else context.project_path / metrics_path
    versions = sorted(p.name for p in metrics_path.iterdir() if p.is_dir()) \\
        if metrics_path.is_dir() else []
    logger.info("%d version(s) under %s", len(versions), metrics_path)


    def ap_row(version: str) -> pd.Series:
        \"\"\"mAP, mAP_50, mAP_75 per IoU type of one saved version (COCO's -1 -> NaN).\"\"\"
        metrics = JSONDataset(filepath=str(metrics_path), version=Version(version, None)).load()
        row = pd.Series({f"{iou_type}/{key}": stats.get(key, float("nan"))
                         for iou_type, stats in metrics.items() for key in AP_KEYS}, dtype=float)
        return row.where(row >= 0)


    by_version = pd.DataFrame({version: ap_row(version) for version in versions}).T
    by_version.index.name = "version"
    by_version"""),
    ("code", """\
    if len(by_version) > 1:
        logger.info("latest minus previous version:\\n%s",
                    by_version.diff().iloc[-1].round(4).to_string())
    if len(by_version) and by_version.notna().any().any():
        fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(by_version) + 3), 4))
        by_version.plot(ax=ax, marker="o", rot=20)
        ax.set(xlabel="version", ylabel="AP", title="coco_metrics by version")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        plt.show()
    else:
        logger.warning("no saved coco_metrics to compare: run `kedro run --pipeline evaluation`")"""),
]

ERROR_ANALYSIS = [
    ("md", """\
    # Error analysis

    Which images the model gets most wrong, and which predictions and ground-truth
    instances are the errors. It reads the evaluation outputs (`predictions`,
    `matched_mask_ious`) of the latest `kedro run --pipeline evaluation`. The matching is
    class-agnostic at mask IoU ≥ 0.5 among predictions with score ≥
    `evaluation.match_score_threshold`: a matched pair of two classes is a confusion, not
    a false positive; predictions inside crowd regions are ignored, as COCO does."""),
    ("code", LOAD_KEDRO),
    ("code", """\
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
    TABLE_ROWS = 20"""),
    ("code", """\
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
                evaluation["split"], len(evaluated), len(predictions), len(matches), threshold)"""),
    ("md", """\
    ## Per-image quality

    `mean_matched_iou` is the mean mask IoU of the image's matched pairs (from
    `matched_mask_ious`). Images are ranked by `image_pq`, the panoptic quality of the
    image alone: sum of matched IoUs / (matched + ½ false positives + ½ missed), so an
    image whose objects were all missed ranks below one with loose masks. Images with
    neither ground truth nor confident predictions have nothing to get wrong and are left
    out."""),
    ("code", """\
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
    per_image["image_pq"] = by_image.sum().reindex(per_image.index).fillna(0.0) \\
        / errors.where(errors > 0)
    ranked = per_image.dropna(subset=["image_pq"]).sort_values(
        ["image_pq", "mean_matched_iou"], na_position="first")
    logger.info("mean image_pq %.3f over %d images", ranked["image_pq"].mean(), len(ranked))
    ranked.head(TABLE_ROWS)"""),
    ("md", """\
    ## The worst images

    Left: predictions with score ≥ the matching threshold; right: ground truth (crowd
    regions left out)."""),
    ("code", ROOT_CELL),
    ("code", """\
    def draw_masks(ax, row, frame: pd.DataFrame, title: str) -> None:
        \"\"\"The image of `row` (an `images` row) with the masks of `frame` tinted.\"\"\"
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
                       evaluation["split"], threshold)"""),
    ("md", "## False positives: confident predictions matched to no ground truth"),
    ("code", """\
    fp_table = fp.assign(**{"class": fp["category_id"].map(names)})[
        ["prediction_id", "image_id", "class", "score", "area"]]
    logger.info("%d false positives with score >= %g", len(fp_table), threshold)
    fp_table.head(TABLE_ROWS)"""),
    ("md", "## Missed ground truth (false negatives), largest first"),
    ("code", """\
    fn_table = fn.assign(**{"class": fn["category_id"].map(names)})[
        ["instance_id", "image_id", "class", "area"]]
    logger.info("%d of %d ground-truth instances missed", len(fn_table), len(gt))
    fn_table.head(TABLE_ROWS)"""),
    ("md", "## Errors per class"),
    ("code", """\
    confused = matches[matches["pred_category_id"] != matches["gt_category_id"]]
    per_class = pd.DataFrame({
        "ground truth": gt["category_id"].map(names).value_counts(),
        "false positives": fp["category_id"].map(names).value_counts(),
        "missed": fn["category_id"].map(names).value_counts(),
        "predicted as another class": confused["gt_category_id"].map(names).value_counts(),
    }).reindex(categories["name"]).fillna(0).astype(int)
    per_class"""),
]

NOTEBOOKS = {
    "data_analysis.ipynb": DATA_ANALYSIS,
    "model_comparison.ipynb": MODEL_COMPARISON,
    "error_analysis.ipynb": ERROR_ANALYSIS,
}


def _cell(kind: str, source: str, cell_id: str):
    """A markdown or code cell with a fixed id, no outputs and no execution count."""
    text = textwrap.dedent(source).strip("\n")
    cell = v4.new_markdown_cell(text) if kind == "md" else v4.new_code_cell(text)
    cell["id"] = cell_id
    return cell


def build_notebook(stem: str, cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    """An nbformat 4 notebook of ``cells`` ((kind, source) pairs) with ids ``{stem}-NN``."""
    notebook = v4.new_notebook(metadata={"kernelspec": KERNELSPEC,
                                         "language_info": {"name": "python"}})
    notebook.cells = [_cell(kind, source, f"{stem}-{index:02d}")
                      for index, (kind, source) in enumerate(cells)]
    nbformat.validate(notebook)
    return notebook


def write_notebooks(out: Path) -> list[Path]:
    """Write every notebook into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, cells in NOTEBOOKS.items():
        path = out / name
        notebook = build_notebook(name.removesuffix(".ipynb").replace("_", "-"), cells)
        path.write_text(nbformat.writes(notebook) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "notebooks",
                        help="folder the notebooks are written to (default: notebooks/)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for path in write_notebooks(args.out):
        logger.info("wrote %s", path)


if __name__ == "__main__":
    main()
