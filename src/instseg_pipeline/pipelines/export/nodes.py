"""Export nodes. torch and onnxruntime are imported inside (through `instseg_pipeline.export`,
`predict.backends` and `models`): `kedro run --pipelines ingestion` must not pay for them."""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from instseg_pipeline.config_schema import as_dict
from instseg_pipeline.data.config import SourceConfig
from instseg_pipeline.data.images import load_image
from instseg_pipeline.export import latency as onnx_latency
from instseg_pipeline.export import parity
from instseg_pipeline.export.config import ExportConfig
from instseg_pipeline.export.manifest import (
    STUFF_KEYS,
    not_exported_reason,
    torch_only_manifest,
)
from instseg_pipeline.export.onnx import ExportError, export_onnx
from instseg_pipeline.predict.backends import TorchBackend
from instseg_pipeline.predict.preprocess import to_chw

logger = logging.getLogger(__name__)


def _network(model: dict):
    """The eager network of a trained-model dict, in eval mode on CPU."""
    from instseg_pipeline.models import load_model

    return load_model(model["config"], model["state_dict"]).eval()


def select_images(images: pd.DataFrame, root: str, count: int,
                  split: str = "val") -> tuple[list[np.ndarray], list]:
    """Up to ``count`` images of ``split`` (uint8 RGB [H, W, 3]) and their ids.

    Distinct sizes first, by image id: the graph must hold for sizes it was not traced at.
    """
    rows = _rows(images, split, count)
    arrays = [load_image(Path(root) / r.file_name, expected_size=(r.width, r.height))[0]
              for r in rows.itertuples()]
    return arrays, rows["image_id"].tolist()


def _rows(images: pd.DataFrame, split: str, count: int) -> pd.DataFrame:
    """Up to ``count`` rows of ``split``: one per distinct size first, then the rest."""
    rows = images[images["split"] == split].sort_values("image_id")
    if rows.empty:
        raise ValueError(f"no {split!r} images in the images table; export checks need some")
    distinct = rows.drop_duplicates(["height", "width"])
    return pd.concat([distinct, rows.drop(distinct.index)]).head(int(count))


def _detects(network, array: np.ndarray) -> bool:
    return bool(len(TorchBackend(network, "cpu")(to_chw(array))["scores"]))


def find_example(network, images: pd.DataFrame, root: str, limit: int) -> np.ndarray:
    """The first of up to ``limit`` val images (distinct sizes first) in which the network
    finds something: tracing an image without detections records only the empty path."""
    rows = _rows(images, "val", limit)
    for row in rows.itertuples():
        array = load_image(Path(root) / row.file_name, expected_size=(row.width, row.height))[0]
        if _detects(network, array):
            logger.info("tracing the export on val image %s (%dx%d)", row.image_id, row.width,
                        row.height)
            return array
    raise ExportError(
        f"none of the {len(rows)} val images tried ({rows['image_id'].tolist()[:10]}...) "
        "yields a detection, and tracing an image without one records only the empty path; "
        "train longer, lower the model's box_score_thresh or raise export.example_search")


def await_evaluation(coco_metrics: dict, pq_metrics: dict | None = None) -> str:
    """``"segm mAP 0.412, bbox mAP 0.398, PQ 0.700"``: the headline of the saved
    ``coco_metrics`` and ``pq_metrics``.

    The node exists for the run order (see the export pipeline): taking an evaluation
    output puts the export after the evaluation's metrics and figures.
    """
    parts = [f"{kind} mAP {coco_metrics[kind]['mAP']:.3f}" for kind in ("segm", "bbox")
             if isinstance(coco_metrics.get(kind), dict)
             and isinstance(coco_metrics[kind].get("mAP"), int | float)]
    pq = ((pq_metrics or {}).get("all") or {}).get("pq")
    if isinstance(pq, int | float):
        parts.append(f"PQ {pq:.3f}")
    return ", ".join(parts) or "no mAP in coco_metrics"


def _label_maps(model: dict) -> dict:
    """The model dict's label -> category id maps for the manifest: ``category_ids`` (things)
    and, for a semantic family, ``stuff_classes`` and ``stuff_category_ids``; those it has."""
    maps = {k: model[k] for k in STUFF_KEYS if model.get(k) is not None}
    if model.get("category_ids") is not None:
        maps["category_ids"] = {str(int(k)): int(v) for k, v in model["category_ids"].items()}
    return maps


def _torch_only(network, model: dict) -> dict | None:
    """``{"onnx": None, "manifest": ...}`` when ``network``'s family cannot be exported
    (its `models.OnnxSpec` says why), else None."""
    from instseg_pipeline.models import family_of

    entry = family_of(network)
    if entry.onnx.exportable:
        return None
    logger.warning("model family %s is not exportable to ONNX: %s. No model.onnx is "
                   "written (the manifest says exported: false), the ONNX parity and latency "
                   "checks are skipped, and serving uses the torch backend", entry.name,
                   entry.onnx.note)
    return {"onnx": None, "manifest": torch_only_manifest(
        entry.name, entry.onnx.note, model["classes"], model["config"],
        iterations=int(model.get("iterations", 0)), **_label_maps(model))}


def _skipped(onnx_model: dict, check: str) -> dict | None:
    """The report of a check that has no graph to run (a torch-only family), else None."""
    reason = not_exported_reason(onnx_model["manifest"])
    if reason is None:
        return None
    logger.info("%s skipped: %s", check, reason)
    return {"exported": False, "reason": reason,
            "family": onnx_model["manifest"].get("family"), "skipped": True}


def export_model(model: dict, images: pd.DataFrame, source: dict, export: dict,
                 evaluation: str | None = None) -> dict:
    """``{"onnx": bytes, "manifest": dict}`` of the trained model, traced on a val image;
    ``{"onnx": None, "manifest": {"exported": false, "reason": ...}}`` for a family that
    cannot be exported.

    ``evaluation`` (`await_evaluation`'s headline) only orders the node after evaluation
    and is logged, so a failing export is reported under the metrics already saved.
    """
    config = ExportConfig.from_params(export)
    if evaluation is not None:
        logger.info("exporting after evaluation (metrics saved: %s)", evaluation)
    network = _network(model)
    torch_only = _torch_only(network, model)
    if torch_only is not None:
        return torch_only
    example = find_example(network, images, SourceConfig.from_params(source).root,
                           config.example_search)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        manifest = export_onnx(
            network, path, opset=config.opset, example=example,
            classes=model["classes"], config=model["config"],
            iterations=int(model.get("iterations", 0)), **_label_maps(model))
        return {"onnx": path.read_bytes(), "manifest": manifest}


def check_onnx_parity(model: dict, onnx_model: dict, images: pd.DataFrame, source: dict,
                      export: dict) -> dict:
    """onnxruntime vs eager on val images + a blank one; raises `ParityError` on failure.
    A torch-only family's report says ``exported: false`` and why."""
    skipped = _skipped(onnx_model, "ONNX parity check")
    if skipped is not None:
        return {**skipped, "passed": None}
    config = ExportConfig.from_params(export)
    network = _network(model)
    arrays, ids = select_images(images, SourceConfig.from_params(source).root,
                                config.parity.num_images)
    arrays, ids = parity.insert_blank(arrays, ids)
    report = parity.check_parity(network, onnx_model["onnx"], arrays, as_dict(config.parity),
                                 image_ids=ids, session_params=as_dict(config.session))
    if not report["no_detection_case_covered"]:
        logger.warning("the blank image got detections from the eager model: the "
                       "no-detection path of the ONNX graph went unchecked")
    parity.raise_on_failure(report)
    return report


def measure_latency(model: dict, onnx_model: dict, parity_report: dict,
                    images: pd.DataFrame, source: dict, export: dict) -> dict:
    """Eager vs onnxruntime latency per image on the same val images and thread count.
    A torch-only family's report says ``exported: false`` and why."""
    skipped = _skipped(onnx_model, "ONNX latency measurement")
    if skipped is not None:
        return {**skipped, "parity_passed": None}
    config = ExportConfig.from_params(export)
    arrays, ids = select_images(images, SourceConfig.from_params(source).root,
                                config.latency.num_images)
    params = {**as_dict(config.latency), "session": as_dict(config.session)}
    report = onnx_latency.measure_latency(_network(model), onnx_model["onnx"], arrays, params,
                                          image_ids=ids)
    return {**report, "parity_passed": bool(parity_report["passed"])}
