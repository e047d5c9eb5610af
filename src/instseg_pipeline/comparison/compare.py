"""Model families side by side: each trained on the same tables with the same budget,
evaluated through the project's inference path and COCO evaluation, and timed.

Kedro-free: the ``model_comparison`` node calls `training_params` and `compare_model` once
per model (inside its own MLflow run), then `comparison_table`. The training budget is
``params:training`` with only ``training.model.name`` swapped (plus the model's own
``model_comparison.overrides``, which may not touch the budget, see `config.SHARED_BUDGET`).
"""
from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from instseg_pipeline.comparison.config import SpeedConfig
from instseg_pipeline.config_schema import ConfigError

logger = logging.getLogger(__name__)

COLUMNS = ["model", "backbone", "mAP", "mAP_50", "mAP_75", "box_mAP", "fps", "fps_onnx",
           "params", "train_seconds", "onnx_note"]
_BACKBONE = re.compile(r"(resnet\d+.*|mobilenet.*|tiny)$")


def merged(base: Mapping, top: Mapping) -> dict:
    """``base`` with ``top`` on top: nested mappings merged key by key, the rest replaced."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def training_params(training: Mapping, name: str, override: Mapping | None = None) -> dict:
    """``params:training`` for model ``name``: its name swapped in, ``override`` on top,
    checkpoints in a folder of its own (a resume must never pick another model's)."""
    override = dict(override or {})
    if "name" in (override.get("model") or {}):
        raise ConfigError(f"model_comparison.overrides.{name}.model.name",
                          "the model's name is the key of its override")
    params = merged(training, override)
    params["model"] = {**(params.get("model") or {}), "name": name}
    params["checkpoint_dir"] = str(Path(training["checkpoint_dir"]) / "model_comparison" / name)
    params["log_model_to_mlflow"] = False
    return params


def check_models(names, where: str = "models[{index}]") -> None:
    """Refuse a model name the registry does not know, before anything is trained;
    ``where`` places it in the block (``{index}``, ``{name}`` filled in)."""
    from instseg_pipeline.models import registry

    for index, name in enumerate(names):
        if name not in registry.FAMILIES:
            raise ConfigError("model_comparison." + where.format(index=index, name=name),
                              f"unknown model {name!r}; registered: "
                              f"{', '.join(sorted(registry.FAMILIES))}")


def backbone_of(name: str, config: Mapping | None = None) -> str:
    """The backbone a model config names, else the end of its model name
    (``yolact_plus_resnet50_fpn`` -> ``resnet50_fpn``, ``solov2_tiny`` -> ``tiny``)."""
    given = (config or {}).get("backbone")
    if isinstance(given, str) and given:
        return given
    found = _BACKBONE.search(name)
    return found.group(1) if found else name


def speed_rows(images: pd.DataFrame, split: str, count: int) -> pd.DataFrame:
    """Up to ``count`` rows of ``split``, one per distinct (height, width) first, by id:
    the same images for every model."""
    rows = images[images["split"] == split].sort_values("image_id")
    if rows.empty:
        raise ValueError(f"no {split!r} images in the images table: the comparison "
                         "evaluates and times on them")
    distinct = rows.drop_duplicates(["height", "width"])
    return pd.concat([distinct, rows.drop(distinct.index)]).head(int(count))


def load_arrays(rows: pd.DataFrame, root: str | Path) -> list[np.ndarray]:
    """uint8 RGB [H, W, 3] of each images-table row."""
    from instseg_pipeline.data.images import load_image

    return [load_image(Path(root) / r.file_name, expected_size=(r.width, r.height))[0]
            for r in rows.itertuples()]


def evaluate(network, images: pd.DataFrame, instances: pd.DataFrame,
             categories: pd.DataFrame, root: str | Path, evaluation) -> dict:
    """Mask and box AP of ``network`` on ``evaluation.split`` through `predict_images` and
    `coco_metrics`: ``{"mAP", "mAP_50", "mAP_75", "box_mAP"}`` (NaN where undefined)."""
    from instseg_pipeline.data.tables import label_mapping
    from instseg_pipeline.evaluation.metrics import coco_metrics
    from instseg_pipeline.predict.batch import predict_images

    to_category = {label: cat for cat, label in label_mapping(categories).items()}
    split = images[images["split"] == evaluation.split]
    predictions = predict_images(network, split, root, to_category,
                                 batch_size=evaluation.batch_size, device=evaluation.device,
                                 score_threshold=evaluation.score_threshold,
                                 mask_threshold=evaluation.mask_threshold)
    stats = coco_metrics(images, instances, categories, predictions, evaluation.split,
                         ("segm", "bbox"), evaluation.backend,
                         allow_pseudo_masks=evaluation.allow_pseudo_masks)["metrics"]
    return {"mAP": _ap(stats["segm"]["mAP"]), "mAP_50": _ap(stats["segm"]["mAP_50"]),
            "mAP_75": _ap(stats["segm"]["mAP_75"]), "box_mAP": _ap(stats["bbox"]["mAP"])}


def _ap(value) -> float:
    """COCO's -1 ("no ground truth") as NaN."""
    value = float(value)
    return math.nan if value < 0 else value


def compare_model(name: str, images: pd.DataFrame, instances: pd.DataFrame,
                  categories: pd.DataFrame, root: str | Path, training: Mapping,
                  evaluation, speed: SpeedConfig, opset: int = 17,
                  session_params: Mapping | None = None,
                  stuff_segments: pd.DataFrame | None = None) -> tuple[dict, dict]:
    """Train, evaluate and time one model; ``(table row, fit result)``.

    ``training`` is that model's `training_params`, ``evaluation`` an `EvaluationConfig`;
    ``stuff_segments`` are the semantic targets of a panoptic family (others ignore them).
    """
    from instseg_pipeline.comparison.speed import measure_speed
    from instseg_pipeline.engine.config import TrainingConfig
    from instseg_pipeline.engine.fit import fit
    from instseg_pipeline.models import load_model

    started = time.perf_counter()
    result = fit(images, instances, categories, root, TrainingConfig.from_params(training),
                 stuff_segments=stuff_segments)
    seconds = time.perf_counter() - started
    saved = result["model"]
    network = load_model(saved["config"], saved["state_dict"]).eval()
    scores = evaluate(network, images, instances, categories, root, evaluation)
    arrays = load_arrays(speed_rows(images, evaluation.split, speed.images), root)
    timing = measure_speed(network, arrays, speed.threads, speed.warmup, speed.repeats,
                           speed.onnx, opset, session_params)
    row = {"model": name, "backbone": backbone_of(name, saved["config"]), **scores,
           **timing, "train_seconds": seconds}
    logger.info("%s: trained %d iterations in %.1f s, mask AP %.4f, box AP %.4f, "
                "%.2f images/s eager, %s ONNX, %d parameters", name, saved["iterations"],
                seconds, row["mAP"], row["box_mAP"], row["fps"],
                "n/a" if math.isnan(row["fps_onnx"]) else f"{row['fps_onnx']:.2f} images/s",
                row["params"])
    return row, result


def comparison_table(rows: list[dict]) -> pd.DataFrame:
    """One row per model, `COLUMNS` in order."""
    table = pd.DataFrame(rows, columns=COLUMNS)
    return table.astype({"params": "int64", "mAP": "float64", "mAP_50": "float64",
                         "mAP_75": "float64", "box_mAP": "float64", "fps": "float64",
                         "fps_onnx": "float64", "train_seconds": "float64"})
