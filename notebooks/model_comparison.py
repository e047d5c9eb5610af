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
# # Model comparison
#
# Two views of the runs so far: the MLflow runs (one per `kedro run` with tracking on)
# and the Kedro-versioned `coco_metrics` (one version per evaluation run, tracked or
# not).

# %%
# %load_ext kedro.ipython

# %%
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
AP_KEYS = ["mAP", "mAP_50", "mAP_75"]

# %% [markdown]
# ## MLflow runs

# %%
mlflow_conf = context.config_loader["mlflow"]
tracking_uri = mlflow_conf["server"]["mlflow_tracking_uri"]  # the project's own store
experiment_name = mlflow_conf["tracking"]["experiment"]["name"]
logger.info("MLflow store %s, experiment %s", tracking_uri, experiment_name)


# %%
def search_runs(uri: str, experiment: str) -> pd.DataFrame:
    """The experiment's runs, oldest first; empty when there is no store yet."""
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
table

# %%
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
    logger.warning("no run has logged %s yet", ", ".join(METRICS))

# %% [markdown]
# ## Kedro versions of `coco_metrics`
#
# Every evaluation run saves a new version folder; each is loaded through a versioned
# `JSONDataset`. COCO's -1 ("no ground truth in this range") becomes empty.

# %%
entry = context.config_loader["catalog"]["coco_metrics"]
metrics_path = Path(entry["filepath"])
metrics_path = metrics_path if metrics_path.is_absolute() else context.project_path / metrics_path
versions = sorted(p.name for p in metrics_path.iterdir() if p.is_dir()) \
    if metrics_path.is_dir() else []
logger.info("%d version(s) under %s", len(versions), metrics_path)


def ap_row(version: str) -> pd.Series:
    """mAP, mAP_50, mAP_75 per IoU type of one saved version (COCO's -1 -> NaN)."""
    metrics = JSONDataset(filepath=str(metrics_path), version=Version(version, None)).load()
    row = pd.Series({f"{iou_type}/{key}": stats.get(key, float("nan"))
                     for iou_type, stats in metrics.items() for key in AP_KEYS}, dtype=float)
    return row.where(row >= 0)


by_version = pd.DataFrame({version: ap_row(version) for version in versions}).T
by_version.index.name = "version"
by_version

# %%
if len(by_version) > 1:
    logger.info("latest minus previous version:\n%s",
                by_version.diff().iloc[-1].round(4).to_string())
if len(by_version) and by_version.notna().any().any():
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(by_version) + 3), 4))
    by_version.plot(ax=ax, marker="o", rot=20)
    ax.set(xlabel="version", ylabel="AP", title="coco_metrics by version")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    plt.show()
else:
    logger.warning("no saved coco_metrics to compare: run `kedro run --pipelines evaluation`")

# %% [markdown]
# ## The `model_comparison` table
#
# One row per trained model, written by `kedro run --pipelines model_comparison`: mask AP
# (`mAP`, `mAP_50`, `mAP_75`), `box_mAP`, images per second in PyTorch (`fps`) and in
# ONNX Runtime (`fps_onnx`), parameter count and training time. The table and its plot
# are Kedro-versioned; the latest version of each is shown.

# %%
from IPython.display import Image, Markdown, display

COMPARISON = "model_comparison"
COMPARISON_PLOT = "model_comparison_plot"
COMPARISON_COLUMNS = ["model", "backbone", "mAP", "mAP_50", "mAP_75", "box_mAP", "fps",
                      "fps_onnx", "params", "train_seconds"]


def missing(name: str) -> str | None:
    """Why catalog entry `name` has nothing to show, or None when it has a saved version."""
    if name not in catalog:
        return f"`{name}` is not in the catalog (env `{context.env}`)."
    if not catalog.exists(name):
        return (f"`{name}` has no saved version yet: run "
                "`kedro run --pipelines model_comparison`.")
    return None


def latest_file(name: str) -> Path | None:
    """The file catalog entry `name` saved last (versioned entries keep
    `<filepath>/<version>/<file name>`); None when its configuration has no `filepath`."""
    entry = context.config_loader["catalog"].get(name, {})
    if "filepath" not in entry:
        return None
    path = Path(entry["filepath"])
    path = path if path.is_absolute() else context.project_path / path
    if not entry.get("versioned"):
        return path
    saved = sorted(p / path.name for p in path.glob("*") if (p / path.name).is_file())
    return saved[-1] if saved else None


# %%
comparison = None
reason = missing(COMPARISON)
if reason:
    display(Markdown(reason))
else:
    comparison = catalog.load(COMPARISON)
    absent = [c for c in COMPARISON_COLUMNS if c not in comparison.columns]
    if absent:
        logger.warning("%s has no column(s) %s", COMPARISON, ", ".join(absent))
    shown = [c for c in COMPARISON_COLUMNS if c in comparison.columns]
    logger.info("%d model(s) in %s", len(comparison), COMPARISON)
    display(comparison[shown + [c for c in comparison.columns if c not in shown]])

# %%
reason = missing(COMPARISON_PLOT)
plot_file = None if reason else latest_file(COMPARISON_PLOT)
if plot_file is None:
    display(Markdown(reason or f"`{COMPARISON_PLOT}` is not saved to a file."))
else:
    logger.info("%s: %s", COMPARISON_PLOT, plot_file)
    display(Image(filename=str(plot_file)))
