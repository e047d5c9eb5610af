"""The manifest of an exported model: the JSON file beside ``<model>.onnx``.

Written by `export.onnx.export_onnx` as ``<model>.manifest.json`` (the names in
`MANIFEST_CANDIDATES` are also accepted when reading)::

    {"format": "instseg-onnx", "format_version": 1, "onnx_file": "model.onnx",
     "sha256": "<hex digest of the .onnx file>", "classes": {"1": "name", ...},
     "opset": 17, "config": {<model config>}, "iterations": 1200,
     "category_ids": {"1": 18, ...}, "input": {...}, "outputs": {...}, "versions": {...},
     "stuff_classes": {"1": "sky", ...}, "stuff_category_ids": {"1": 119, ...}}

``sha256`` and ``classes`` are required, ``iterations`` and ``category_ids`` (model label ->
dataset category id, identity when absent) optional; a semantic family's manifest also has
``stuff_classes`` (semantic label 1..S -> name) and ``stuff_category_ids`` (semantic label
-> stuff category id), and its ``outputs`` list ``semantic``; a file whose digest differs is
refused. ``input`` and ``outputs`` state the graph's contract (`INPUT_POLICY`,
`OUTPUT_LAYOUT`).

A model of a family that cannot be exported (``OnnxSpec(exportable=False)``) gets a
manifest without a graph (`torch_only_manifest`): ``"exported": false``, the ``reason`` and
the ``family``, and no ``.onnx`` file beside it; `not_exported_reason` reads it, and the
predictor then serves the trained model with torch. A manifest without ``exported`` is one
of an exported graph.

Reading a manifest needs neither torch, onnx nor Kedro: the server and the catalog dataset
import this module alone (`library_versions` imports what it reports, when called).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

INPUT_NAME = "image"
MANIFEST_FORMAT = "instseg-onnx"
MANIFEST_VERSION = 1
MANIFEST_CANDIDATES = ("{stem}.manifest.json", "{name}.json", "{stem}.json", "manifest.json")
INPUT_POLICY = {
    "name": INPUT_NAME, "dtype": "float32", "shape": [3, "height", "width"],
    "layout": "CHW", "color": "RGB", "range": [0.0, 1.0], "batch": 1,
    "dynamic_axes": ["height", "width"],
    "note": "one image per run: the traced Mask R-CNN fixes the number of images, so the "
            "graph has no batch axis; resizing and normalisation happen inside",
}
OUTPUT_LAYOUT = {  # the raw outputs of `predict.backends` (OUTPUT_NAMES)
    "boxes": "float32 [N, 4] x1, y1, x2, y2 in input pixels",
    "labels": "int64 [N] class labels (keys of classes)",
    "scores": "float32 [N] in [0, 1], best first",
    "masks": "float32 [N, 1, H, W] probabilities at input size (threshold 0.5)",
}
SEMANTIC_LAYOUT = {  # the fifth output of a semantic family
    "semantic": "int64 [H, W] labels at input size: 0 things, 1..S stuff (keys of "
                "stuff_classes)",
}
STUFF_KEYS = ("stuff_classes", "stuff_category_ids")


class ManifestError(ValueError):
    """An exported model whose manifest is missing, malformed or does not match the file."""


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


def stuff_entries(stuff_classes: Mapping | None, stuff_category_ids: Mapping | None) -> dict:
    """``{"stuff_classes": {"k": name}, "stuff_category_ids": {"k": id}}`` with the given
    ones (JSON-friendly keys, as ``classes``); empty for a model without stuff."""
    out = {}
    if stuff_classes is not None:
        out["stuff_classes"] = {str(int(k)): str(v) for k, v in stuff_classes.items()}
    if stuff_category_ids is not None:
        out["stuff_category_ids"] = {str(int(k)): int(v) for k, v in stuff_category_ids.items()}
    return out


def build_manifest(onnx_path: Path, opset: int, example_size: tuple[int, int],
                   classes: Mapping | None, config: Mapping | None,
                   exporter: str = "torchscript", semantic: bool = False,
                   stuff_classes: Mapping | None = None,
                   stuff_category_ids: Mapping | None = None, **extra) -> dict:
    """The manifest of an exported file (SHA-256 computed here). ``semantic``: the graph
    has the ``semantic`` output (`SEMANTIC_LAYOUT`)."""
    outputs = {**OUTPUT_LAYOUT, **(SEMANTIC_LAYOUT if semantic else {})}
    return {"format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION,
            "onnx_file": onnx_path.name, "sha256": file_sha256(onnx_path),
            "classes": {str(int(k)): str(v) for k, v in (classes or {}).items()},
            "opset": int(opset), "config": dict(config or {}), "exporter": exporter,
            "example_size": [int(s) for s in example_size], "input": INPUT_POLICY,
            "outputs": outputs, "versions": library_versions(),
            **stuff_entries(stuff_classes, stuff_category_ids), **extra}


def torch_only_manifest(family: str, reason: str, classes: Mapping | None,
                        config: Mapping | None, stuff_classes: Mapping | None = None,
                        stuff_category_ids: Mapping | None = None, **extra) -> dict:
    """The manifest of a model whose family cannot be exported: no graph, the reason."""
    return {"format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION, "exported": False,
            "family": family, "reason": reason, "onnx_file": None,
            "classes": {str(int(k)): str(v) for k, v in (classes or {}).items()},
            "config": dict(config or {}),
            **stuff_entries(stuff_classes, stuff_category_ids), **extra}


def not_exported_reason(manifest: Mapping) -> str | None:
    """Why the manifest's model has no ONNX graph (a torch-only family), or None."""
    if manifest.get("exported", True) is not False:
        return None
    return (f"model family {manifest.get('family', '?')} is not exportable to ONNX: "
            f"{manifest.get('reason') or 'no reason given'}")


def write_manifest(manifest: Mapping, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


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


def find_manifest(onnx_path: str | Path) -> Path:
    """The manifest beside ``onnx_path`` (first of `MANIFEST_CANDIDATES` that exists)."""
    onnx_path = Path(onnx_path)
    names = [c.format(stem=onnx_path.stem, name=onnx_path.name) for c in MANIFEST_CANDIDATES]
    for name in names:
        if (onnx_path.parent / name).is_file():
            return onnx_path.parent / name
    raise ManifestError(f"{onnx_path}: no manifest beside it (looked for {', '.join(names)}); "
                        "an ONNX model is only served with the manifest written at export")


def read_manifest(path: str | Path) -> dict:
    """The manifest at ``path``, checked for its required keys; classes (and a semantic
    model's stuff_classes and stuff_category_ids) keyed by int."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path}: cannot read the manifest ({exc})") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path}: manifest is not a JSON object")
    missing = [k for k in ("sha256", "classes") if k not in manifest]
    if missing:
        raise ManifestError(f"{path}: manifest lacks the keys {missing}")
    try:
        manifest["classes"] = {int(k): str(v) for k, v in manifest["classes"].items()}
    except (AttributeError, ValueError):
        raise ManifestError(f"{path}: manifest classes must map integer labels to names"
                            ) from None
    for key, cast in (("stuff_classes", str), ("stuff_category_ids", int)):
        if key not in manifest:
            continue
        try:
            manifest[key] = {int(k): cast(v) for k, v in manifest[key].items()}
        except (AttributeError, TypeError, ValueError):
            raise ManifestError(f"{path}: manifest {key} must map integer semantic labels to "
                                f"{'names' if cast is str else 'category ids'}") from None
    return manifest
