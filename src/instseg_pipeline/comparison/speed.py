"""Inference speed of one network at batch 1: eager torch and, where its family exports,
ONNX Runtime, on the same preprocessed images and thread count.

Both backends are the project's (`predict.backends`) and take inputs preprocessed once
(`predict.preprocess.to_chw`), so the speed is that of the network and the backend's output
conversion, not of image decoding. A family that cannot be exported, or whose export fails,
gets NaN images/s for ONNX and the reason, never an exception. torch and onnxruntime are
imported inside the functions.
"""
from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from instseg_pipeline.predict.backends import OnnxBackend, TorchBackend
from instseg_pipeline.predict.preprocess import to_chw

logger = logging.getLogger(__name__)


def images_per_second(run: Callable[[np.ndarray], dict], inputs: Sequence[np.ndarray],
                      warmup: int = 1, repeats: int = 1) -> float:
    """Images per second of ``run`` over ``inputs`` (float32 [3, H, W] each) at batch 1:
    ``warmup`` untimed runs of the first input, then ``repeats`` timed passes over all."""
    if not inputs:
        raise ValueError("no images to time")
    for _ in range(int(warmup)):
        run(inputs[0])
    started = time.perf_counter()
    for _ in range(int(repeats)):
        for x in inputs:
            run(x)
    return len(inputs) * int(repeats) / (time.perf_counter() - started)


def short_error(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message``, at most ``limit`` characters: the exporter's
    errors carry the whole traced graph after their first line."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def count_parameters(network) -> int:
    """Number of parameters of ``network`` (trainable and frozen; buffers not counted)."""
    return int(sum(p.numel() for p in network.parameters()))


def eager_fps(network, inputs: Sequence[np.ndarray], threads: int, warmup: int = 1,
              repeats: int = 1) -> float:
    """Images/s of the eager network on CPU with ``threads`` torch threads."""
    from instseg_pipeline.export.latency import torch_threads

    backend = TorchBackend(network.eval(), "cpu")
    with torch_threads(threads):
        return images_per_second(backend, inputs, warmup, repeats)


def tracing_example(network, arrays: Sequence[np.ndarray]) -> np.ndarray | None:
    """The first image (uint8 [H, W, 3]) with a detection, or None: a trace of an image
    without one records only the empty path (see `export.onnx`)."""
    backend = TorchBackend(network, "cpu")
    return next((a for a in arrays if len(backend(to_chw(a))["scores"])), None)


def export_for_timing(network, arrays: Sequence[np.ndarray], folder: Path,
                      opset: int) -> tuple[Path | None, str]:
    """``(model.onnx path, "")`` or ``(None, why not)`` for ``network``'s family."""
    from instseg_pipeline.export.onnx import export_onnx
    from instseg_pipeline.models import family_of

    entry = family_of(network)
    if not entry.onnx.exportable:
        return None, f"{entry.name} is not exportable to ONNX: {entry.onnx.note}"
    example = tracing_example(network, arrays)
    if example is None:
        return None, (f"none of the {len(arrays)} timed images yields a detection of "
                      f"{entry.name}, so there is no example to trace the export with")
    path = folder / "model.onnx"
    try:
        export_onnx(network, path, opset=opset, example=example)
    except Exception as exc:  # noqa: BLE001 - any tracing failure is a reason, not a crash
        return None, f"ONNX export of {entry.name} failed: {short_error(exc)}"
    return path, ""


def onnx_fps(network, arrays: Sequence[np.ndarray], threads: int, warmup: int = 1,
             repeats: int = 1, opset: int = 17,
             session_params: Mapping | None = None) -> tuple[float, str]:
    """``(images/s, "")`` of ONNX Runtime with ``threads`` intra-op threads, or
    ``(nan, reason)`` when the family does not export or the export or session fails."""
    from instseg_pipeline.export.latency import torch_threads
    from instseg_pipeline.export.onnx import create_session

    network = network.eval().cpu()
    with tempfile.TemporaryDirectory() as folder, torch_threads(threads):
        path, reason = export_for_timing(network, arrays, Path(folder), opset)
        if path is None:
            return math.nan, reason
        try:
            session = create_session(path, {**(session_params or {}),
                                            "intra_op_num_threads": int(threads)})
            backend = OnnxBackend(session)
            return images_per_second(backend, [to_chw(a) for a in arrays], warmup,
                                     repeats), ""
        except Exception as exc:  # noqa: BLE001 - e.g. an op onnxruntime cannot run
            return math.nan, f"ONNX Runtime failed: {short_error(exc)}"


def measure_speed(network, arrays: Sequence[np.ndarray], threads: int = 1, warmup: int = 1,
                  repeats: int = 1, onnx: bool = True, opset: int = 17,
                  session_params: Mapping | None = None) -> dict:
    """``{"fps", "fps_onnx", "onnx_note", "params"}`` of ``network`` on ``arrays`` (uint8
    RGB [H, W, 3]); ``fps_onnx`` is NaN with the reason in ``onnx_note`` when not measured."""
    inputs = [to_chw(a) for a in arrays]
    result = {"fps": eager_fps(network, inputs, threads, warmup, repeats),
              "fps_onnx": math.nan, "onnx_note": "not measured (speed.onnx is false)",
              "params": count_parameters(network)}
    if onnx:
        result["fps_onnx"], result["onnx_note"] = onnx_fps(
            network, arrays, threads, warmup, repeats, opset, session_params)
        if result["onnx_note"]:
            logger.warning("ONNX speed of %s not measured: %s", _name(network),
                           result["onnx_note"])
    return result


def _name(network) -> str:
    from instseg_pipeline.models import family_of

    try:
        return family_of(network).name
    except ValueError:
        return type(network).__name__
