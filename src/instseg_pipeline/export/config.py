"""The ``export`` parameters block as a typed, frozen config (conf/base/parameters_export.yml);
built once in each export node.

Defaults equal the base YAML's values. No torch, onnx or Kedro here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from instseg_pipeline.config_schema import Schema


@dataclass(frozen=True, kw_only=True)
class ParityConfig:
    """onnxruntime vs eager on val images (+ a blank one); a mismatch fails the run."""

    num_images: int = 3                     # val images, distinct sizes first
    box_atol: float = 1.0                   # px in the input image's frame
    score_atol: float = 0.005               # also the band around the score threshold
    mask_iou_min: float = 0.9               # per matched instance, masks at 0.5
    match_iou: float = 0.5                  # box IoU pairing same-label detections
    semantic_agreement_min: float = 0.99    # semantic family: share of pixels labelled alike


@dataclass(frozen=True, kw_only=True)
class LatencyConfig:
    """Eager vs onnxruntime latency per image on the same images and thread count."""

    num_images: int = 3
    threads: int = 1                        # torch threads and onnxruntime intra-op threads
    warmup: int = 2
    repeats: int = 10


@dataclass(frozen=True, kw_only=True)
class SessionConfig:
    """onnxruntime SessionOptions (measured in benchmarks/onnx_latency.py)."""

    graph_optimization_level: Literal["disable", "basic", "extended", "all"] = "all"
    intra_op_num_threads: int | None = None  # null: onnxruntime's default
    inter_op_num_threads: int | None = 1
    execution_mode: Literal["sequential", "parallel"] = "sequential"
    enable_mem_pattern: bool = True


@dataclass(frozen=True, kw_only=True)
class ExportConfig(Schema):
    """Everything under ``export:``."""

    BLOCK = "export"

    opset: int = 17
    example_search: int = 32                # val images tried for a tracing example
    parity: ParityConfig = field(default_factory=ParityConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    session: SessionConfig = field(default_factory=SessionConfig)
