"""What training from boxes costs: one model per mask variant of the train split, all at the
same budget, each evaluated on the same val split against the annotated masks (Kedro-free).

Variants (`VARIANTS`): ``full`` (the tables as they are), ``box`` and ``grabcut`` (every
train instance's mask replaced by that pseudo-mask of its box) and ``mixed``
(``mixed_full_fraction`` of the train images keep their masks, the rest get ``grabcut``).
`data.pseudo_masks.replace_with_pseudo_masks` builds them; val is never touched, and the
evaluation reads the original tables. The ``weak_supervision_comparison`` node calls
`check_annotated`, then per variant `variant_instances`, `variant_training_params` and
`train_and_evaluate` (each inside an MLflow run of its own), then `comparison_rows`.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from instseg_pipeline.comparison.compare import merged
from instseg_pipeline.comparison.mask_quality import mask_sources
from instseg_pipeline.comparison.weak_config import BudgetConfig, WeakSupervisionConfig

logger = logging.getLogger(__name__)

COLUMNS = ["variant", "method", "pseudo_share", "pseudo_image_share", "mAP", "mAP_50",
           "mAP_75", "box_mAP", "mAP_vs_full", "iterations", "train_seconds"]
METRICS = ("pseudo_share", "pseudo_image_share", "mAP", "mAP_50", "mAP_75", "box_mAP",
           "iterations", "train_seconds")


def check_annotated(instances: pd.DataFrame) -> None:
    """Refuse tables that already carry pseudo-masks: the comparison needs the annotated
    masks of both splits (``full`` trains on them, every variant is scored on them).
    The error says how many, which annotation ids (the first 5) and which methods."""
    sources = mask_sources(instances)
    pseudo = instances[sources != "annotated"]
    if pseudo.empty:
        return
    methods = ", ".join(f"{k} {v}" for k, v in sources[pseudo.index].value_counts().items())
    ids = ", ".join(str(int(i)) for i in pseudo["annotation_id"].head(5))
    raise ValueError(
        f"the weak supervision comparison needs annotated masks, but {len(pseudo)} "
        f"instances carry pseudo-masks ({methods}; annotation ids {ids}"
        f"{', ...' if len(pseudo) > 5 else ''}). Run it on a source with masks and "
        "ingestion.box_only.fraction 0")


def variant_method(variant: str) -> str | None:
    """The pseudo-mask method of a variant's replaced masks (None for ``full``)."""
    return {"full": None, "box": "box", "grabcut": "grabcut", "mixed": "grabcut"}[variant]


def variant_instances(variant: str, images: pd.DataFrame, instances: pd.DataFrame,
                      root: str | Path, config: WeakSupervisionConfig) -> pd.DataFrame:
    """The instances table ``variant`` trains on: ``full`` as it is, ``box`` / ``grabcut``
    every train image's masks replaced by that method's pseudo-masks, ``mixed``
    ``1 - mixed_full_fraction`` of the train images replaced by ``grabcut``."""
    method = variant_method(variant)
    if method is None:
        return instances
    from instseg_pipeline.data.pseudo_masks import replace_with_pseudo_masks

    fraction = 1.0 - config.mixed_full_fraction if variant == "mixed" else 1.0
    table, counts = replace_with_pseudo_masks(images, instances, str(root), fraction,
                                              config.pseudo_mask_config(method))
    logger.info("%s: %d of %d train images got %s pseudo-masks (%d instances; fallbacks %s)",
                variant, counts["images"], counts["train_images"], method,
                counts["instances"], counts["fallbacks"] or 0)
    return table


def pseudo_shares(images: pd.DataFrame, instances: pd.DataFrame,
                  split: str = "train") -> tuple[float, float]:
    """(share of the split's non-crowd instances with a pseudo-mask, share of its images
    with at least one instance that hold a pseudo-mask); 0.0 for a split without any."""
    ids = images.loc[images["split"] == split, "image_id"]
    rows = instances[instances["image_id"].isin(ids) & ~instances["iscrowd"].astype(bool)]
    if rows.empty:
        return 0.0, 0.0
    pseudo = mask_sources(rows) != "annotated"
    per_image = pseudo.groupby(rows["image_id"]).any()
    return float(pseudo.mean()), float(per_image.mean())


def variant_training_params(training: Mapping, variant: str, budget: BudgetConfig,
                            pseudo_mask_loss_weight: float | None = None) -> dict:
    """``params:training`` for one variant: the shared budget (``budget``'s null keys keep
    training's values; multistep milestones stay at their fraction of the run), no
    validation or model selection inside the budget, a fresh start (no resume) in a
    checkpoint folder of the variant's own, the model not logged to MLflow, and
    ``pseudo_mask_loss_weight`` when given."""
    from instseg_pipeline.engine.config import TrainingConfig

    config = TrainingConfig.from_params(training)
    max_iters = budget.max_iters or config.max_iters
    minutes = (budget.time_budget_min if budget.time_budget_min is not None
               else config.time_budget_min)
    milestones = [max(1, round(m * max_iters / config.max_iters))
                  for m in config.scheduler.milestones]
    params = merged(training, {
        "max_iters": max_iters, "time_budget_min": minutes,
        "scheduler": {"milestones": milestones},
        "selection": {"every_epochs": 0}, "val_max_images": 0, "resume": "none",
        "checkpoint_dir": str(Path(config.checkpoint_dir) / "weak_supervision" / variant),
        "log_model_to_mlflow": False})
    if pseudo_mask_loss_weight is not None:
        params["pseudo_mask_loss_weight"] = pseudo_mask_loss_weight
    return params


def train_and_evaluate(variant: str, images: pd.DataFrame, train_instances: pd.DataFrame,
                       instances: pd.DataFrame, categories: pd.DataFrame, root: str | Path,
                       training: Mapping, evaluation,
                       stuff_segments: pd.DataFrame | None = None) -> tuple[dict, dict]:
    """Train on ``train_instances`` (the variant's table), evaluate on ``evaluation.split``
    of ``instances`` (the annotated table); ``(row, fit result)``, the row holding
    `COLUMNS` but ``mAP_vs_full``. ``evaluation`` is an `EvaluationConfig`."""
    from instseg_pipeline.comparison.compare import evaluate
    from instseg_pipeline.engine.config import TrainingConfig
    from instseg_pipeline.engine.fit import fit
    from instseg_pipeline.models import load_model

    share, image_share = pseudo_shares(images, train_instances)
    started = time.perf_counter()
    result = fit(images, train_instances, categories, root,
                 TrainingConfig.from_params(training), stuff_segments=stuff_segments)
    seconds = time.perf_counter() - started
    saved = result["model"]
    network = load_model(saved["config"], saved["state_dict"]).eval()
    scores = evaluate(network, images, instances, categories, root, evaluation)
    row = {"variant": variant, "method": variant_method(variant) or "annotated",
           "pseudo_share": share, "pseudo_image_share": image_share, **scores,
           "iterations": int(saved["iterations"]), "train_seconds": seconds}
    logger.info("%s: %.0f %% of the train instances pseudo-masked, trained %d iterations in "
                "%.1f s, mask AP %.4f, box AP %.4f", variant, 100 * share, row["iterations"],
                seconds, row["mAP"], row["box_mAP"])
    return row, result


def _number(value):
    """A JSON-safe float: None for NaN."""
    value = float(value)
    return None if math.isnan(value) else value


def comparison_rows(rows: Sequence[Mapping]) -> list[dict]:
    """`COLUMNS` of each row, ``mAP_vs_full`` (mask AP over the ``full`` variant's; None
    without a ``full`` row or with its AP 0 or undefined) added, NaN as None."""
    full = next((r["mAP"] for r in rows if r["variant"] == "full"), math.nan)
    full = float(full) if full is not None else math.nan
    out = []
    for row in rows:
        ratio = (float(row["mAP"]) / full if full > 0 and not math.isnan(float(row["mAP"]))
                 else math.nan)
        clean = {**row, "mAP_vs_full": ratio}
        out.append({k: clean[k] if k in ("variant", "method", "iterations")
                    else _number(clean[k]) for k in COLUMNS})
    return out


def _cell(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def comparison_table(rows: Sequence[Mapping]) -> str:
    """A markdown table of `comparison_rows`."""
    head = ("| variant | pseudo share | mask AP | AP50 | AP75 | box AP | vs full | "
            "iterations | train s |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {_cell(r['pseudo_share'], 2)} | {_cell(r['mAP'])} | "
            f"{_cell(r['mAP_50'])} | {_cell(r['mAP_75'])} | {_cell(r['box_mAP'])} | "
            f"{_cell(r['mAP_vs_full'], 2)} | {r['iterations']} | "
            f"{_cell(r['train_seconds'], 1)} |")
    return "\n".join(lines)


def comparison_plot(rows: Sequence[Mapping]):
    """A Figure: mask AP, AP50, AP75 and box AP of each variant as grouped bars (values on
    top, n/a where undefined), the pseudo-masked share of the train instances under each variant's name (matplotlib
    without pyplot)."""
    from matplotlib.figure import Figure

    metrics = (("mAP", "mask AP"), ("mAP_50", "mask AP50"), ("mAP_75", "mask AP75"),
               ("box_mAP", "box AP"))
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    ax = figure.subplots()
    width = 0.8 / len(metrics)
    xs = np.arange(len(rows))
    for index, (key, label) in enumerate(metrics):
        heights = [r[key] if r[key] is not None else 0.0 for r in rows]
        bars = ax.bar(xs + (index - (len(metrics) - 1) / 2) * width, heights, width,
                      label=label)
        ax.bar_label(bars, labels=[_cell(r[key], 2) for r in rows], fontsize=6, padding=1)
    ax.set_xticks(xs, [f"{r['variant']}\n{_cell(r['pseudo_share'], 2)} pseudo"
                       for r in rows])
    ax.set_ylim(0.0, 1.05)
    ax.set_ylabel("AP on the val split (annotated masks)")
    ax.set_title("Training from boxes: the same budget per variant")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    return figure
