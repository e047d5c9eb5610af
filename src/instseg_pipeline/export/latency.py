"""Latency of eager PyTorch against onnxruntime on the same images and thread count.

Both run through the project's backends (`predict.backends`) on inputs preprocessed once
(`predict.preprocess.to_chw`), so the times are those of the networks and the backends'
output conversion, not of image decoding.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from instseg_pipeline.config_schema import as_dict
from instseg_pipeline.export.config import LatencyConfig
from instseg_pipeline.export.onnx import DEFAULT_SESSION, create_session
from instseg_pipeline.predict.backends import OnnxBackend, TorchBackend
from instseg_pipeline.predict.preprocess import to_chw

logger = logging.getLogger(__name__)


def _ms(run, x: np.ndarray) -> float:
    started = time.perf_counter()
    run(x)
    return (time.perf_counter() - started) * 1000.0


def latency_stats(ms: np.ndarray) -> dict:
    """Median and p90 of per-image run times (all images and repeats pooled)."""
    return {"median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)),
            "runs": int(ms.size)}


@contextmanager
def torch_threads(threads: int):
    """``torch.set_num_threads(threads)`` for the block; the previous count restored."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def time_backends(network, onnx_model: str | Path | bytes, images: Sequence[np.ndarray],
                  threads: int, warmup: int, repeats: int,
                  session_params: Mapping | None = None) -> dict[str, np.ndarray]:
    """Per-image run times in ms, ``{"torch": [n, repeats], "onnxruntime": [n, repeats]}``.

    Both use ``threads`` intra-op threads. The backends take turns, one block of all images
    per repeat each: drift on a shared machine then hits both, and neither thread pool
    spins while the other one works mid-block.
    """
    inputs = [to_chw(image) for image in images]
    session = create_session(onnx_model, {**(session_params or {}),
                                          "intra_op_num_threads": threads})
    runs = {"torch": TorchBackend(network, "cpu"), "onnxruntime": OnnxBackend(session)}
    ms = {name: np.empty((len(inputs), repeats)) for name in runs}
    with torch_threads(threads):
        for run in runs.values():
            for x in inputs[:1] * warmup:
                run(x)
        for r in range(repeats):
            for name, run in runs.items():
                ms[name][:, r] = [_ms(run, x) for x in inputs]
    return ms


def measure_latency(network, onnx_model: str | Path | bytes, images: Sequence[np.ndarray],
                    params: Mapping | None = None, image_ids: Sequence | None = None) -> dict:
    """Eager PyTorch and onnxruntime latency side by side, with the ratio ort / torch.

    ``params``: threads, warmup, repeats (defaults: `export.config.LatencyConfig`), session
    (onnxruntime options, see `session_options`). Returns ``{"torch": {median_ms, p90_ms},
    "onnxruntime": {...}, "ratio": {"median", "p90"}, "per_image": [...], ...}``.
    """
    params = {**as_dict(LatencyConfig()), **(params or {})}
    threads = int(params["threads"] or 1)
    session = {**DEFAULT_SESSION, **params.get("session", {}), "intra_op_num_threads": threads}
    ms = time_backends(network, onnx_model, images, threads, int(params["warmup"]),
                       int(params["repeats"]), session)
    stats = {name: latency_stats(values) for name, values in ms.items()}
    ids = list(image_ids) if image_ids is not None else list(range(len(images)))
    report = {**stats, "ratio": {q: stats["onnxruntime"][f"{q}_ms"] / stats["torch"][f"{q}_ms"]
                                 for q in ("median", "p90")},
              "threads": threads, "session": session,
              "per_image": [{"image_id": i, "height": int(im.shape[0]), "width": int(im.shape[1]),
                             "torch_median_ms": float(np.median(t)),
                             "onnxruntime_median_ms": float(np.median(o))}
                            for i, im, t, o in zip(ids, images, ms["torch"], ms["onnxruntime"])]}
    logger.info("latency (%d threads): torch median %.1f ms, onnxruntime %.1f ms (ratio %.2f)",
                threads, stats["torch"]["median_ms"], stats["onnxruntime"]["median_ms"],
                report["ratio"]["median"])
    return report
