"""ONNX export of a torchvision Mask R-CNN, its parity gate and a latency report.

The exported graph takes ONE image, float32 ``[3, H, W]`` RGB in [0, 1], any H and W (the
network resizes and normalises inside), and returns ``boxes`` float32 [N, 4] xyxy in input
pixels, ``labels`` int64 [N], ``scores`` float32 [N], ``masks`` float32 [N, 1, H, W]
probabilities pasted at input size: the layout of the eager model's output.

Known traps of tracing torchvision's Mask R-CNN, and what this module does about them:

- Batch: the traced forward takes a list of images whose length is fixed at trace time, so
  a dynamic batch axis would be a lie. The graph has no batch axis; callers loop.
- Empty paths: branches such as ``if boxes.numel() == 0`` are decided while tracing. An
  example without detections records the empty path only, so `export_onnx` refuses one.
  Images without detections at run time go through the same graph (the parity gate runs a
  blank image and then a normal one through one session to prove it).
- Resize: torchvision computes the resize scale from the traced shape when it sees a
  tracer, so no size is baked in, but it computes the output size in float32 where eager
  computes ``int(side * scale)`` in float64. For about one image size in five the two
  disagree by a pixel (a 640x586 image: eager resizes to 244x224, the graph to 244x223)
  and every output drifts (scores by ~0.01). `eager_exact_resize` swaps in, for the export
  only, a resize that does eager's arithmetic in float64, so the graph resizes exactly as
  eager does for every size; the parity gate checks sizes that used to differ.

The TorchScript exporter (``dynamo=False``) is used: the dynamo exporter fails inside
``batched_nms`` for Mask R-CNN.

The manifest written beside ``<model>.onnx`` as ``<model>.manifest.json`` follows the format
that ``serving.predictor`` reads (format, format_version, onnx_file, sha256, classes, opset,
config) and adds the input policy, output layout and library versions.

torch, onnx and onnxruntime are imported inside the functions that use them: the serving
side reads manifests through this package without paying for them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
import types
import warnings
from collections.abc import Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAMES = ("boxes", "labels", "scores", "masks")
DEFAULT_OPSET = 17
MANIFEST_FORMAT = "instseg-onnx"
MANIFEST_VERSION = 1
INPUT_POLICY = {
    "name": INPUT_NAME, "dtype": "float32", "shape": [3, "height", "width"],
    "layout": "CHW", "color": "RGB", "range": [0.0, 1.0], "batch": 1,
    "dynamic_axes": ["height", "width"],
    "note": "one image per run: the traced Mask R-CNN fixes the number of images, so the "
            "graph has no batch axis; resizing and normalisation happen inside",
}
OUTPUT_LAYOUT = {
    "boxes": "float32 [N, 4] x1, y1, x2, y2 in input pixels",
    "labels": "int64 [N] class labels (keys of classes)",
    "scores": "float32 [N] in [0, 1], best first",
    "masks": "float32 [N, 1, H, W] probabilities at input size (threshold 0.5)",
}
# measured in benchmarks/onnx_latency.py; see parameters_export.yml
DEFAULT_SESSION = {
    "graph_optimization_level": "all", "intra_op_num_threads": None,
    "inter_op_num_threads": 1, "execution_mode": "sequential", "enable_mem_pattern": True,
}
DEFAULT_PARITY = {"box_atol": 1.0, "score_atol": 0.005, "mask_iou_min": 0.9, "match_iou": 0.5}
BLANK_ID = "blank"


class ManifestError(ValueError):
    """An exported model whose manifest is missing, malformed or does not match the file."""


class ParityError(AssertionError):
    """ONNX Runtime and eager PyTorch disagree beyond the tolerances; says where and how."""


class ExportError(RuntimeError):
    """The model cannot be exported as asked (e.g. an example without detections)."""


# --- images ----------------------------------------------------------------------------------

def to_chw(image: np.ndarray) -> np.ndarray:
    """uint8 RGB ``[H, W, 3]`` -> float32 ``[3, H, W]`` in [0, 1] (the exported input)."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
    return np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32) / np.float32(255)


def blank_image(height: int, width: int) -> np.ndarray:
    """An all-black uint8 ``[H, W, 3]`` image: a trained detector finds nothing there."""
    return np.zeros((height, width, 3), np.uint8)


def insert_blank(images: list[np.ndarray], image_ids: list) -> tuple[list, list]:
    """Put a blank image (the first image's size) in the middle of the list.

    In the middle, not at the end: the image after it proves that a run without detections
    leaves the session fit for the next one.
    """
    if not images:
        raise ValueError("parity needs at least one image")
    at = max(1, len(images) // 2)
    blank = blank_image(*images[0].shape[:2])
    return images[:at] + [blank] + images[at:], image_ids[:at] + [BLANK_ID] + image_ids[at:]


# --- running both backends -------------------------------------------------------------------

def eager_detect(network, image: np.ndarray) -> dict[str, np.ndarray]:
    """Eager outputs for float32 ``[3, H, W]``: boxes [N, 4], labels, scores, masks [N,1,H,W]."""
    import torch

    network.eval()
    with torch.inference_mode():
        output = network([torch.from_numpy(image)])[0]
    return {k: output[k].numpy() for k in OUTPUT_NAMES}


def onnx_detect(session, image: np.ndarray) -> dict[str, np.ndarray]:
    """The same outputs from an onnxruntime session."""
    return dict(zip(OUTPUT_NAMES, session.run(list(OUTPUT_NAMES), {INPUT_NAME: image})))


# --- export and manifest ---------------------------------------------------------------------

def _example(network, example: np.ndarray | None, example_size: tuple[int, int]):
    """The tracing example as a tensor; refuses one without detections (see module doc)."""
    import torch

    if example is None:
        rng = np.random.default_rng(0)
        example = rng.integers(0, 256, (*example_size, 3), dtype=np.uint8)
    image = to_chw(example)
    found = len(eager_detect(network, image)["scores"])
    if found == 0:
        raise ExportError(
            f"export example {image.shape[1]}x{image.shape[2]} yields no detections: the "
            "traced graph would hold only the empty path; pass an image with detections")
    return torch.from_numpy(image), found


def _resize_like_eager(transform, image, target=None):
    """Eval-time `GeneralizedRCNNTransform.resize`, traceable to the same output size.

    Eager: ``int(side * min(min_size / short, max_size / long))`` in float64. True division
    (not reciprocal-and-multiply, which is what ``python_float / tensor`` traces to) keeps
    every rounding step identical to Python's.
    """
    import torch
    from torch.onnx import operators

    shape = operators.shape_as_tensor(image)[-2:].to(torch.float64)
    limits = torch.tensor([float(transform.min_size[-1]), float(transform.max_size)],
                          dtype=torch.float64)
    scale = torch.min(torch.div(limits, torch.stack([shape.min(), shape.max()])))
    size = torch.floor(shape * scale).to(torch.int64)
    size = [size[0], size[1]] if torch.jit.is_tracing() else size.tolist()
    resized = torch.nn.functional.interpolate(image[None], size=size, mode="bilinear",
                                              align_corners=False)[0]
    return resized, target


@contextmanager
def eager_exact_resize(network):
    """Within the block, ``network.transform`` resizes with `_resize_like_eager`.

    Eager results are unchanged (same size, same interpolation); only what a tracer
    records differs. A fixed-size transform has no size arithmetic and is left alone.
    """
    transform = network.transform
    if transform.fixed_size is not None:
        yield network
        return
    # an instance attribute shadows the class's method; deleting it restores the method
    transform.resize = types.MethodType(_resize_like_eager, transform)
    try:
        yield network
    finally:
        del transform.resize


def _dynamic_axes() -> dict:
    axes = {INPUT_NAME: {1: "height", 2: "width"}}
    axes.update({name: {0: "detections"} for name in OUTPUT_NAMES})
    axes["masks"] = {0: "detections", 2: "height", 3: "width"}
    return axes


def _trace_to_onnx(network, example, path: Path, opset: int, exact_resize: bool) -> None:
    import torch

    resize = eager_exact_resize(network) if exact_resize else nullcontext()
    with warnings.catch_warnings(), resize:
        # tracing torchvision's detector warns about python-side shape arithmetic and
        # tensor copies in code that is tracing-aware; the parity gate on other image sizes
        # is the real check, so these would only bury a genuine warning in noise
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        for module in (r"torch\.", r"torchvision\."):
            warnings.filterwarnings("ignore", category=UserWarning, module=module)
            warnings.filterwarnings("ignore", category=FutureWarning, module=module)
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
        torch.onnx.export(network, ([example],), str(path), dynamo=False,
                          opset_version=int(opset), input_names=[INPUT_NAME],
                          output_names=list(OUTPUT_NAMES), dynamic_axes=_dynamic_axes(),
                          do_constant_folding=True)


def library_versions() -> dict[str, str]:
    """Versions of the libraries that produce and run the graph."""
    import onnx
    import onnxruntime
    import torch
    import torchvision

    return {"torch": torch.__version__, "torchvision": torchvision.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_path(onnx_path: str | Path) -> Path:
    """``<dir>/<model>.onnx`` -> ``<dir>/<model>.manifest.json``."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(f"{onnx_path.stem}.manifest.json")


def build_manifest(onnx_path: Path, opset: int, example_size: tuple[int, int],
                   classes: Mapping | None, config: Mapping | None, **extra) -> dict:
    """The manifest of an exported file (SHA-256 computed here)."""
    return {"format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION,
            "onnx_file": onnx_path.name, "sha256": file_sha256(onnx_path),
            "classes": {str(int(k)): str(v) for k, v in (classes or {}).items()},
            "opset": int(opset), "config": dict(config or {}), "exporter": "torchscript",
            "example_size": [int(s) for s in example_size], "input": INPUT_POLICY,
            "outputs": OUTPUT_LAYOUT, "versions": library_versions(), **extra}


def write_manifest(manifest: Mapping, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def export_onnx(network, path: str | Path, opset: int = DEFAULT_OPSET,
                example_size: tuple[int, int] = (224, 256), example: np.ndarray | None = None,
                classes: Mapping | None = None, config: Mapping | None = None,
                exact_resize: bool = True, **extra) -> dict:
    """Export ``network`` (eval mode, CPU) to ``path``; write and return its manifest.

    ``example``: uint8 RGB ``[H, W, 3]`` to trace with (it must yield detections); without
    it a seeded noise image of ``example_size`` ``(H, W)`` is used. ``classes`` maps label
    -> name, ``config`` is the `models.model_config` the network was built from; ``extra``
    keys (e.g. ``iterations``) go into the manifest as they are. ``exact_resize=False``
    keeps torchvision's float32 resize arithmetic (see the module doc; for comparisons).
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    network = network.eval().cpu()
    tensor, found = _example(network, example, example_size)
    started = time.perf_counter()
    _trace_to_onnx(network, tensor, path, opset, exact_resize)
    onnx.checker.check_model(str(path))
    size = tuple(tensor.shape[1:])
    logger.info("exported %s (opset %d, example %dx%d with %d detections) in %.1f s", path,
                opset, *size, found, time.perf_counter() - started)
    manifest = build_manifest(path, opset, size, classes, config,
                              resize="float64, as eager" if exact_resize else "float32",
                              **extra)
    write_manifest(manifest, manifest_path(path))
    return manifest


def check_digest(actual: str, manifest: Mapping, where: str) -> str:
    expected = str(manifest.get("sha256", "")).lower()
    if actual != expected:
        raise ManifestError(
            f"{where}: SHA-256 {actual} does not match the manifest's {expected or '(none)'};"
            " the model file changed after export or the manifest belongs to another model")
    return actual


def verify_manifest(onnx_path: str | Path, manifest: Mapping) -> str:
    """The file's SHA-256 when it equals the manifest's; raises `ManifestError` if not."""
    return check_digest(file_sha256(onnx_path), manifest, str(onnx_path))


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


def create_session(onnx_model: str | Path | bytes, params: Mapping | None = None):
    """A CPU onnxruntime session for a file path or the serialized model bytes."""
    import onnxruntime as ort

    model = onnx_model if isinstance(onnx_model, bytes) else str(onnx_model)
    return ort.InferenceSession(model, session_options(params),
                                providers=["CPUExecutionProvider"])


# --- parity --------------------------------------------------------------------------------

def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of xyxy boxes float [N, 4] x [M, 4] -> float64 [N, M]."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two bool masks [H, W]; two empty masks agree (1.0)."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def match_detections(eager: Mapping, onnx: Mapping, min_iou: float) -> list[tuple[int, int]]:
    """Hungarian matching on box IoU among same-label pairs; pairs with IoU >= ``min_iou``."""
    from scipy.optimize import linear_sum_assignment

    iou = box_iou(eager["boxes"], onnx["boxes"])
    iou[eager["labels"][:, None] != onnx["labels"][None, :]] = 0.0
    if iou.size == 0:
        return []
    rows, cols = linear_sum_assignment(iou, maximize=True)
    return [(int(i), int(j)) for i, j in zip(rows, cols) if iou[i, j] >= min_iou]


def marginal_detections(outputs: Mapping, limits: Mapping) -> np.ndarray:
    """bool [N]: detections at a cut, which one backend may keep and the other drop.

    Which detections survive a cut depends on the last bits of their scores, so a
    numerically tiny difference may change them: a score within ``score_atol`` of the score
    threshold, or, when the backend returned the maximum number of detections, within
    ``score_atol`` of the last score kept (the top-k cut; untrained heads and flat image
    regions give exactly tied scores there, and the backends break ties differently).
    """
    scores, atol = np.asarray(outputs["scores"], np.float64), limits["score_atol"]
    marginal = np.abs(scores - limits["score_threshold"]) <= atol
    if len(scores) and len(scores) >= limits["detections_per_img"]:
        marginal |= np.abs(scores - scores.min()) <= atol
    return marginal


def _alone(outputs: Mapping, matched: set, marginal: np.ndarray) -> tuple[int, list[float]]:
    """How many detections lack a partner, and the scores of those not at a cut."""
    alone = [i for i in range(len(outputs["scores"])) if i not in matched]
    return len(alone), [float(outputs["scores"][i]) for i in alone if not marginal[i]]


def _pair_stats(eager: Mapping, onnx: Mapping, pairs: list) -> dict:
    """Largest box and score differences and the smallest mask IoU over matched pairs
    (None without pairs)."""
    if not pairs:
        return {"max_box_diff": None, "max_score_diff": None, "min_mask_iou": None}
    i, j = (np.array(idx) for idx in zip(*pairs))
    box = np.abs(eager["boxes"][i] - onnx["boxes"][j]).max(axis=1)
    score = np.abs(eager["scores"][i] - onnx["scores"][j])
    ious = [mask_iou(eager["masks"][a, 0] > 0.5, onnx["masks"][b, 0] > 0.5) for a, b in pairs]
    worst = int(np.argmin(ious))
    return {"max_box_diff": float(box.max()), "max_score_diff": float(score.max()),
            "min_mask_iou": float(ious[worst]), "worst_box": int(i[np.argmax(box)]),
            "worst_score": int(i[np.argmax(score)]), "worst_mask": int(i[worst])}


def _pair_failures(stats: dict, limits: Mapping) -> list[str]:
    """Matched pairs further apart than the tolerances, in words."""
    out = []
    if stats["max_box_diff"] > limits["box_atol"]:
        out.append(f"box of eager detection #{stats['worst_box']} differs by "
                   f"{stats['max_box_diff']:.3f} px > box_atol {limits['box_atol']}")
    if stats["max_score_diff"] > limits["score_atol"]:
        out.append(f"score of eager detection #{stats['worst_score']} differs by "
                   f"{stats['max_score_diff']:.4f} > score_atol {limits['score_atol']}")
    if stats["min_mask_iou"] < limits["mask_iou_min"]:
        out.append(f"mask IoU of eager detection #{stats['worst_mask']} is "
                   f"{stats['min_mask_iou']:.3f} < mask_iou_min {limits['mask_iou_min']}")
    return out


def _failures(stats: dict, unmatched: dict, limits: Mapping) -> list[str]:
    """What broke, in words (empty when within tolerances)."""
    out = [] if stats["max_box_diff"] is None else _pair_failures(stats, limits)
    for side, bad in unmatched.items():
        if bad:
            out.append(f"{len(bad)} {side} detection(s) without a partner and not at a "
                       f"cut (score threshold {limits['score_threshold']}; scores "
                       f"{', '.join(f'{s:.3f}' for s in bad[:5])})")
    return out


def compare_detections(eager: Mapping, onnx: Mapping, limits: Mapping) -> dict:
    """One image's parity record: counts, matched pairs, worst differences, failures.

    Pairs of two marginal detections (`marginal_detections`) are left out of the
    differences: tied candidates at a cut may pair up with each other, not with their twin.
    """
    pairs = match_detections(eager, onnx, limits["match_iou"])
    m_e, m_o = marginal_detections(eager, limits), marginal_detections(onnx, limits)
    firm = [(i, j) for i, j in pairs if not (m_e[i] and m_o[j])]
    n_e, bad_e = _alone(eager, {i for i, _ in pairs}, m_e)
    n_o, bad_o = _alone(onnx, {j for _, j in pairs}, m_o)
    stats = _pair_stats(eager, onnx, firm)
    failures = _failures(stats, {"eager": bad_e, "onnx": bad_o}, limits)
    if len(onnx["masks"]) and onnx["masks"].shape[1:] != eager["masks"].shape[1:]:
        failures.append(f"onnx masks have shape {onnx['masks'].shape[1:]}, eager "
                        f"{eager['masks'].shape[1:]}")
    return {"eager_detections": len(eager["scores"]), "onnx_detections": len(onnx["scores"]),
            "matched": len(pairs), "marginal_pairs": len(pairs) - len(firm),
            "unmatched_eager": n_e, "unmatched_onnx": n_o,
            **{k: stats[k] for k in ("max_box_diff", "max_score_diff", "min_mask_iou")},
            "failures": failures, "passed": not failures}


def parity_limits(network, params: Mapping | None) -> dict:
    """Tolerances (`DEFAULT_PARITY`, ``params`` override) plus the network's own cuts."""
    limits = {**DEFAULT_PARITY, **{k: v for k, v in (params or {}).items()
                                   if k in DEFAULT_PARITY}}
    limits["score_threshold"] = float(network.roi_heads.score_thresh)
    limits["detections_per_img"] = int(network.roi_heads.detections_per_img)
    return limits


def _ort_errors() -> tuple[type[Exception], ...]:
    """onnxruntime's run-time error types (they derive from Exception only)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "RuntimeException", "NotImplemented", "EPFail",
             "InvalidGraph")
    return tuple(getattr(state, name) for name in names if hasattr(state, name))


def is_flat(image: np.ndarray) -> bool:
    """True for an image of one colour (such as `blank_image`)."""
    return bool(image.size) and bool((image == image.reshape(-1, image.shape[-1])[0]).all())


def ungate_flat(record: dict) -> dict:
    """A flat image's record with its differences kept as notes, not failures.

    On an image of one colour every anchor away from the border sees the same input, so the
    RPN's objectness scores tie exactly and which tied proposals survive its top-k cut is the
    backend's tie-break. A model that detects anything there (an under-trained one does)
    then yields detections that legitimately differ between backends. What stays gated on
    such an image: onnxruntime runs, the outputs have the right shapes, and where both
    backends find nothing the no-detection path is covered.
    """
    if not record.get("eager_detections") or not record["failures"]:
        return record
    shape = [f for f in record["failures"] if f.startswith("onnx masks have shape")]
    notes = [f for f in record["failures"] if f not in shape]
    return {**record, "failures": shape, "passed": not shape,
            "ungated": "flat image: tied RPN scores, the backends break ties differently",
            "notes": notes}


def _image_record(network, session, image: np.ndarray, image_id, limits: Mapping) -> dict:
    chw = to_chw(image)
    record = {"image_id": image_id, "height": int(chw.shape[1]), "width": int(chw.shape[2])}
    eager = eager_detect(network, chw)
    try:
        onnx = onnx_detect(session, chw)
    except _ort_errors() as exc:  # a failing run is a parity failure to report, not a crash
        return {**record, "eager_detections": len(eager["scores"]), "passed": False,
                "failures": [f"onnxruntime failed: {exc}"]}
    record = {**record, **compare_detections(eager, onnx, limits)}
    if is_flat(image):
        record = ungate_flat(record)
        for note in record.get("notes", []):
            logger.warning("ONNX parity, image %s (flat, not gated): %s", image_id, note)
    return record


def _summary(records: list[dict], limits: Mapping) -> dict:
    def worst(key, fn):
        values = [r[key] for r in records if r.get(key) is not None]
        return float(fn(values)) if values else None

    blank = [r for r in records if r["image_id"] == BLANK_ID]
    return {"passed": all(r["passed"] for r in records), "images": len(records),
            "max_box_diff": worst("max_box_diff", max),
            "max_score_diff": worst("max_score_diff", max),
            "min_mask_iou": worst("min_mask_iou", min),
            "no_detection_case_covered": any(r.get("eager_detections") == 0 for r in blank),
            "tolerances": dict(limits)}


def check_parity(network, onnx_path: str | Path | bytes, images: Sequence[np.ndarray],
                 params: Mapping | None = None, image_ids: Sequence | None = None,
                 session_params: Mapping | None = None) -> dict:
    """Compare onnxruntime with eager PyTorch image by image, in the given order.

    ``images``: uint8 RGB ``[H, W, 3]`` of different sizes, a blank one among them (see
    `insert_blank`); all run through ONE onnxruntime session so that state left by one run
    shows in the next. ``params``: box_atol (px), score_atol, mask_iou_min (masks
    thresholded at 0.5), match_iou (box IoU to pair detections of the same label). On a
    flat image (one colour) differences in detections are reported, not gated
    (`ungate_flat`).
    Returns ``{"passed", "max_box_diff", "max_score_diff", "min_mask_iou", "images": n,
    "per_image": [...], "tolerances"}``; raising is the caller's call (`raise_on_failure`).
    """
    limits = parity_limits(network, params)
    session = create_session(onnx_path, session_params)
    ids = list(image_ids) if image_ids is not None else list(range(len(images)))
    records = [_image_record(network, session, image, image_id, limits)
               for image, image_id in zip(images, ids)]
    report = {**_summary(records, limits), "per_image": records}
    logger.info("ONNX parity %s on %d images: max box diff %s px, max score diff %s, "
                "min mask IoU %s", "passed" if report["passed"] else "FAILED", len(records),
                report["max_box_diff"], report["max_score_diff"], report["min_mask_iou"])
    return report


def raise_on_failure(report: Mapping) -> None:
    """Raise `ParityError` naming every failing image and what failed there."""
    if report["passed"]:
        return
    lines = [f"image {r['image_id']} ({r['height']}x{r['width']}): " + "; ".join(r["failures"])
             for r in report["per_image"] if not r["passed"]]
    raise ParityError("ONNX export does not match eager PyTorch:\n  " + "\n  ".join(lines))


# --- latency -------------------------------------------------------------------------------

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
    runs = {"torch": lambda x: eager_detect(network, x),
            "onnxruntime": lambda x: onnx_detect(session, x)}
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

    ``params``: threads (default 1), warmup (default 2), repeats (default 5), session
    (onnxruntime options, see `session_options`). Returns ``{"torch": {median_ms, p90_ms},
    "onnxruntime": {...}, "ratio": {"median", "p90"}, "per_image": [...], ...}``.
    """
    params = dict(params or {})
    threads = int(params.get("threads") or 1)
    session = {**DEFAULT_SESSION, **params.get("session", {}), "intra_op_num_threads": threads}
    ms = time_backends(network, onnx_model, images, threads, int(params.get("warmup", 2)),
                       int(params.get("repeats", 5)), session)
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
