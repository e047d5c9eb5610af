"""ONNX export of a torchvision Mask R-CNN, and the onnxruntime sessions that run it.

The exported graph takes ONE image, float32 ``[3, H, W]`` RGB in [0, 1], any H and W (the
network resizes and normalises inside), and returns ``boxes`` float32 [N, 4] xyxy in input
pixels, ``labels`` int64 [N], ``scores`` float32 [N], ``masks`` float32 [N, 1, H, W]
probabilities pasted at input size: the layout of the eager model's output. A semantic
family (Panoptic FPN) adds a fifth output, ``semantic`` int64 [H, W] (labels 0..S at input
size), and its manifest names the stuff labels (``stuff_classes``, ``stuff_category_ids``).

Known traps of tracing torchvision's Mask R-CNN, and what this module does about them:

- Batch: the traced forward takes a list of images whose length is fixed at trace time, so
  a dynamic batch axis would be a lie. The graph has no batch axis; callers loop.
- Empty paths: branches such as ``if boxes.numel() == 0`` are decided while tracing. An
  example without detections records the empty path only, so `export_onnx` refuses one.
  Images without detections at run time go through the same graph (the parity gate,
  `export.parity`, runs a blank image and then a normal one through one session to prove it).
- Family specifics: how a network is traced is its model family's `models.OnnxSpec`
  (exporter, a tracing hook, or why it cannot be exported). For Mask R-CNN the hook is
  `models.maskrcnn.eager_exact_resize` (the traced resize must round like eager's) and the
  exporter is TorchScript (``dynamo=False``): the dynamo exporter fails inside
  ``batched_nms``. `export_onnx` writes the manifest (`export.manifest`) beside
the file. torch, onnx and onnxruntime are imported inside the functions that use them.
"""
from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from instseg_pipeline.config_schema import as_dict
from instseg_pipeline.export.config import SessionConfig
from instseg_pipeline.export.manifest import (
    INPUT_NAME,
    build_manifest,
    manifest_path,
    write_manifest,
)
from instseg_pipeline.predict.backends import OUTPUT_NAMES, SEMANTIC_NAME, TorchBackend
from instseg_pipeline.predict.preprocess import to_chw

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17
# the schema's defaults (measured in benchmarks/onnx_latency.py)
DEFAULT_SESSION = as_dict(SessionConfig())


class ExportError(RuntimeError):
    """The model cannot be exported as asked (e.g. an example without detections)."""


# --- export ----------------------------------------------------------------------------------

def _example(network, example: np.ndarray | None, example_size: tuple[int, int]):
    """The tracing example as a tensor; refuses one without detections (see module doc)."""
    import torch

    if example is None:
        rng = np.random.default_rng(0)
        example = rng.integers(0, 256, (*example_size, 3), dtype=np.uint8)
    image = to_chw(example)
    found = len(TorchBackend(network, "cpu")(image)["scores"])
    if found == 0:
        raise ExportError(
            f"export example {image.shape[1]}x{image.shape[2]} yields no detections: the "
            "traced graph would hold only the empty path; pass an image with detections")
    return torch.from_numpy(image), found


def output_names(network) -> list[str]:
    """The graph's output names: `OUTPUT_NAMES`, then ``semantic`` for a semantic family
    (the order of the eager output dict, which the tracer flattens)."""
    from instseg_pipeline.models import family_of

    return [*OUTPUT_NAMES, *([SEMANTIC_NAME] if family_of(network).semantic else [])]


def _dynamic_axes(names: list[str]) -> dict:
    axes = {INPUT_NAME: {1: "height", 2: "width"}}
    axes.update({name: {0: "detections"} for name in OUTPUT_NAMES})
    axes["masks"] = {0: "detections", 2: "height", 3: "width"}
    if SEMANTIC_NAME in names:
        axes[SEMANTIC_NAME] = {0: "height", 1: "width"}
    return axes


def onnx_spec(network):
    """The `models.OnnxSpec` of ``network``'s family; `ExportError` when it has none."""
    from instseg_pipeline.models import family_of

    spec = family_of(network).onnx
    if not spec.exportable:
        raise ExportError(f"model family {family_of(network).name} cannot be exported to "
                          f"ONNX: {spec.note}; serve it with the torch backend")
    return spec


def _trace_to_onnx(network, example, path: Path, opset: int, exact_resize: bool) -> None:
    import torch

    spec = onnx_spec(network)
    hook = spec.tracing(network) if exact_resize else nullcontext()
    with warnings.catch_warnings(), hook:
        # tracing torchvision's detector warns about python-side shape arithmetic and
        # tensor copies in code that is tracing-aware; the parity gate on other image sizes
        # is the real check, so these would only bury a genuine warning in noise
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        for module in (r"torch\.", r"torchvision\."):
            warnings.filterwarnings("ignore", category=UserWarning, module=module)
            warnings.filterwarnings("ignore", category=FutureWarning, module=module)
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
        names = output_names(network)
        torch.onnx.export(network, ([example],), str(path), dynamo=spec.exporter == "dynamo",
                          opset_version=int(opset), input_names=[INPUT_NAME],
                          output_names=names, dynamic_axes=_dynamic_axes(names),
                          do_constant_folding=True)


def export_onnx(network, path: str | Path, opset: int = DEFAULT_OPSET,
                example_size: tuple[int, int] = (224, 256), example: np.ndarray | None = None,
                classes: Mapping | None = None, config: Mapping | None = None,
                exact_resize: bool = True, stuff_classes: Mapping | None = None,
                stuff_category_ids: Mapping | None = None, **extra) -> dict:
    """Export ``network`` (eval mode, CPU) to ``path``; write and return its manifest.

    ``example``: uint8 RGB ``[H, W, 3]`` to trace with (it must yield detections); without
    it a seeded noise image of ``example_size`` ``(H, W)`` is used. ``classes`` maps label
    -> name, ``config`` is the `models.model_config` the network was built from;
    ``stuff_classes`` (semantic label -> name) and ``stuff_category_ids`` (semantic label ->
    stuff category id) of a semantic family go into the manifest when given; ``extra``
    keys (e.g. ``iterations``) go into the manifest as they are. ``exact_resize=False``
    keeps torchvision's float32 resize arithmetic (see the module doc; for comparisons).
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    network = network.eval().cpu()
    spec = onnx_spec(network)  # a family that cannot be exported says why before any work
    if int(opset) < spec.min_opset:
        logger.info("export: opset %s raised to %d, the lowest that holds this family's ops "
                    "(%s)", opset, spec.min_opset, spec.note)
        opset = spec.min_opset
    tensor, found = _example(network, example, example_size)
    started = time.perf_counter()
    _trace_to_onnx(network, tensor, path, opset, exact_resize)
    onnx.checker.check_model(str(path))
    size = tuple(tensor.shape[1:])
    logger.info("exported %s (opset %d, example %dx%d with %d detections) in %.1f s", path,
                opset, *size, found, time.perf_counter() - started)
    manifest = build_manifest(path, opset, size, classes, config,
                              exporter=spec.exporter,
                              semantic=SEMANTIC_NAME in output_names(network),
                              stuff_classes=stuff_classes,
                              stuff_category_ids=stuff_category_ids,
                              resize="float64, as eager" if exact_resize else "float32",
                              **extra)
    write_manifest(manifest, manifest_path(path))
    return manifest


# --- onnxruntime sessions ----------------------------------------------------------------------

def session_options(params: Mapping | None = None):
    """``onnxruntime.SessionOptions`` from `DEFAULT_SESSION` keys (``params`` override).

    graph_optimization_level: disable | basic | extended | all; execution_mode: sequential
    | parallel; thread counts: null leaves onnxruntime's default.
    """
    import onnxruntime as ort

    cfg = {**DEFAULT_SESSION, **(params or {})}
    unknown = sorted(set(cfg) - set(DEFAULT_SESSION))
    if unknown:
        raise ValueError(f"unknown onnxruntime session options {unknown}; "
                         f"known: {sorted(DEFAULT_SESSION)}")
    levels = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
              "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel,
                                               levels[cfg["graph_optimization_level"]])
    options.execution_mode = getattr(ort.ExecutionMode, f"ORT_{cfg['execution_mode'].upper()}")
    options.enable_mem_pattern = bool(cfg["enable_mem_pattern"])
    for key in ("intra_op_num_threads", "inter_op_num_threads"):
        if cfg[key] is not None:
            setattr(options, key, int(cfg[key]))
    return options


def create_session(onnx_model: str | Path | bytes, params: Mapping | None = None,
                   providers: list[str] | None = None):
    """An onnxruntime session (CPU unless ``providers`` say otherwise) for a file path or
    the serialized model bytes; ``params`` as in `session_options`. Every session of the
    project is made here."""
    import onnxruntime as ort

    model = onnx_model if isinstance(onnx_model, bytes) else str(onnx_model)
    return ort.InferenceSession(model, session_options(params),
                                providers=providers or ["CPUExecutionProvider"])
