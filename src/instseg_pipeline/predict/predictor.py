"""One image in, instances out: a trained model (torch) or its ONNX export (onnxruntime).

Both backends get the same input, float32 ``[3, H, W]`` in [0, 1] at the image's own size
(the network resizes and normalises inside), and give the same raw outputs: boxes float32
[N, 4] xyxy, labels int64 [N], scores float32 [N], masks float32 [N, 1, H, W] probabilities
pasted at full image size. `Predictor` turns those into instances with COCO RLE masks.

ONNX manifest: a JSON file beside ``<model>.onnx`` (``<model>.manifest.json``; the names
in `MANIFEST_CANDIDATES` are also accepted) holding::

    {"format": "instseg-onnx", "format_version": 1, "onnx_file": "model.onnx",
     "sha256": "<hex digest of the .onnx file>", "classes": {"1": "name", ...},
     "opset": 17, "config": {<model config>}, "iterations": 1200,
     "category_ids": {"1": 18, ...}}

``sha256`` and ``classes`` are required, ``iterations`` and ``category_ids`` (model label ->
dataset category id, identity when absent) optional; a file whose digest differs is refused.
The same optional ``category_ids`` key is read from a trained model dict. The format
is written by `instseg_pipeline.export` (`write_manifest`, `verify_manifest`); reading it for serving
lives here (`find_manifest`, `read_manifest`).
"""
from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from instseg_pipeline.data.images import DEFAULT_MAX_PIXELS, ImageProblem, _to_rgb_array
from instseg_pipeline.data.masks import bitmap_to_rle, rle_area, rle_to_string

# The manifest is written by the exporter; these are re-exported for the serving side.
from instseg_pipeline.export import (  # noqa: F401
    ManifestError,
    file_sha256,
    verify_manifest,
    write_manifest,
)
from instseg_pipeline.export import manifest_path as default_manifest_path  # noqa: F401

logger = logging.getLogger(__name__)

MANIFEST_CANDIDATES = ("{stem}.manifest.json", "{name}.json", "{stem}.json", "manifest.json")
MODEL_DICT_KEYS = ("config", "state_dict", "classes")
OUTPUT_NAMES = ("boxes", "labels", "scores", "masks")


class ModelNotFoundError(FileNotFoundError):
    """No model file where one was expected; the message says where it looked."""


# --- images ---------------------------------------------------------------------------------

def _open_upload(data: bytes, max_pixels: int) -> Image.Image:
    """A lazily decoded Pillow image whose header passed the size checks."""
    if len(data) == 0:
        raise ImageProblem("empty_file", "upload is empty (0 bytes)")
    try:
        # Pillow warns between its limit and twice it and raises above; our own, usually
        # lower, limit follows. (No warnings.catch_warnings: it is not thread-safe.)
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageProblem("too_many_pixels", f"upload header claims too many pixels ({exc})"
                           ) from None
    except UnidentifiedImageError:
        raise ImageProblem("not_an_image", "upload is not a readable image (JPEG, PNG, "
                                           "TIFF, BMP, WebP, ...)") from None
    except OSError as exc:
        raise ImageProblem("corrupt", f"cannot read the image header ({exc})") from None
    if image.width * image.height > max_pixels:
        raise ImageProblem("too_many_pixels",
                           f"image is {image.width}x{image.height} = "
                           f"{image.width * image.height} pixels, over the limit {max_pixels}")
    return image


def decode_upload(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """uint8 RGB ``[H, W, 3]`` of an encoded image, with the policy of `images.load_image`.

    The pixel count is checked from the header before anything is decoded; EXIF orientation
    is applied; 16-bit and float images are rescaled, other modes converted by Pillow.
    Raises `ImageProblem` (reason empty_file, not_an_image, corrupt or too_many_pixels).
    """
    image = _open_upload(data, max_pixels)
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageProblem("corrupt", f"image data is truncated or corrupt ({exc})") from None
    return _to_rgb_array(_exif_oriented(image))


def _exif_oriented(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, KeyError, TypeError):  # broken EXIF: keep pixels
        return image


# --- files, digests and the manifest ---------------------------------------------------------

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
    """The manifest at ``path``, checked for its required keys; classes keyed by int."""
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
    return manifest


def find_latest_checkpoint(root: str | Path = ".", source_name: str | None = None) -> Path:
    """Newest Kedro-versioned ``data/06_models/<source>/model.pt/<version>/model.pt`` under root.

    Versions are timestamps, so the lexicographically largest is the newest; with several
    sources the newest version of any wins unless ``source_name`` picks one.
    """
    pattern = f"data/06_models/{source_name or '*'}/model.pt/*/model.pt"
    found = sorted(Path(root).glob(pattern), key=lambda p: (p.parent.name, str(p)))
    if not found:
        raise ModelNotFoundError(
            f"no trained model found: looked for {Path(root).resolve() / pattern}; train one "
            "(kedro run --pipeline training) or pass a checkpoint or an ONNX file")
    return found[-1]


# --- backends ---------------------------------------------------------------------------------

def resolve_device(device: str = "auto") -> str:
    """``auto`` is CUDA when available, else CPU; anything else is passed through."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class TorchBackend:
    """Calls a torchvision detection model on one image; ``name`` = torch."""

    name = "torch"

    def __init__(self, model, device: str = "auto"):
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()

    def __call__(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """``image`` float32 [3, H, W] in [0, 1] -> raw outputs (see the module docstring)."""
        import torch

        with torch.inference_mode():
            output = self.model([torch.from_numpy(image).to(self.device)])[0]
        return {k: output[k].float().cpu().numpy() if k != "labels" else
                output[k].cpu().numpy() for k in OUTPUT_NAMES}


class OnnxBackend:
    """Runs an exported model with onnxruntime; ``name`` = onnxruntime."""

    name = "onnxruntime"

    def __init__(self, path: str | Path, providers: list[str] | None = None,
                 threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(str(path), options, providers=providers or
                                            ["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        names = [o.name for o in self.session.get_outputs()]
        # exports name their outputs; an unnamed export is read in the documented order
        self.output_names = list(OUTPUT_NAMES) if set(OUTPUT_NAMES) <= set(names) else names[:4]
        self.device = "cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu"

    def __call__(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """``image`` float32 [3, H, W] in [0, 1] -> raw outputs (see the module docstring)."""
        values = self.session.run(self.output_names, {self.input_name: image})
        return dict(zip(OUTPUT_NAMES, values))


# --- post-processing --------------------------------------------------------------------------

@dataclass(frozen=True)
class Detections:
    """Instances of one image above a score threshold, best first.

    boxes float32 [N, 4] xyxy, labels int64 [N], scores float32 [N], masks uint8 [N, H, W].
    """

    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    masks: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)


def _select(raw: dict, height: int, width: int, score_threshold: float,
            mask_threshold: float) -> Detections:
    scores = np.asarray(raw["scores"], np.float32).reshape(-1)
    keep = np.flatnonzero(scores >= score_threshold)
    keep = keep[np.argsort(-scores[keep], kind="stable")]
    masks = np.asarray(raw["masks"]).reshape(len(scores), height, width)[keep]
    return Detections(boxes=np.asarray(raw["boxes"], np.float32).reshape(-1, 4)[keep],
                      labels=np.asarray(raw["labels"]).astype(np.int64).reshape(-1)[keep],
                      scores=scores[keep], masks=(masks > mask_threshold).astype(np.uint8))


def mask_polygons(mask: np.ndarray) -> list[list[float]]:
    """COCO polygon parts ``[[x1, y1, x2, y2, ...], ...]`` of the outer contours of ``mask``."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
    return [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]


def instance_dict(mask: np.ndarray, box, label: int, score: float, classes: Mapping,
                  polygon: bool = False) -> dict:
    """JSON-ready instance: label, category_name, score, box xyxy, bbox xywh, area, rle."""
    x1, y1, x2, y2 = (float(v) for v in box)
    rle = bitmap_to_rle(mask)
    out = {"label": int(label), "category_name": classes.get(int(label), str(label)),
           "score": float(score), "box": [x1, y1, x2, y2], "bbox": [x1, y1, x2 - x1, y2 - y1],
           "area": rle_area(rle), "rle": {"size": [int(s) for s in mask.shape],
                                          "counts": rle_to_string(rle)}}
    if polygon:
        out["polygon"] = mask_polygons(mask)
    return out


# --- the predictor ----------------------------------------------------------------------------

class Predictor:
    """Instance segmentation of one image at a time; safe to call from several threads.

    Build with `from_checkpoint`, `from_model` or `from_onnx`. ``classes`` maps model
    labels to names; ``version`` names the weights (file SHA-256 or training iterations);
    ``category_ids`` maps labels to dataset category ids (identity when not saved).
    """

    def __init__(self, backend: Callable[[np.ndarray], dict], classes: Mapping[int, str],
                 version: Mapping, category_ids: Mapping | None = None):
        self.backend = backend
        self.classes = {int(k): str(v) for k, v in classes.items()}
        self.category_ids = {int(k): int(v) for k, v in (category_ids or {}).items()} or {
            label: label for label in self.classes}
        self.version = dict(version)
        # torchvision models and onnxruntime sessions are not documented as re-entrant
        self._lock = threading.Lock()

    @classmethod
    def from_model(cls, model_dict: Mapping, device: str = "auto",
                   sha256: str | None = None, source: str | None = None) -> Predictor:
        """From ``{"config", "state_dict", "classes", "iterations"}`` (a training output)."""
        from instseg_pipeline.models import load_model

        missing = [k for k in MODEL_DICT_KEYS if k not in model_dict]
        if missing:
            raise ValueError(f"{source or 'model dict'}: missing keys {missing}; expected "
                             f"{list(MODEL_DICT_KEYS)} (+ iterations)")
        model = load_model(model_dict["config"], model_dict["state_dict"])
        iterations = model_dict.get("iterations")
        return cls(TorchBackend(model, device), model_dict["classes"], _version(
            sha256, None if iterations is None else int(iterations), source,
            model_dict["config"].get("name")), model_dict.get("category_ids"))

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto",
                        threads: int | None = None) -> Predictor:
        """From a model file saved by `instseg_pipeline.kedro_ext.datasets.TorchModelDataset`.

        ``threads`` sets torch's intra-op threads for the whole process.
        """
        import torch

        if threads:
            torch.set_num_threads(int(threads))
        path = Path(path)
        if not path.is_file():
            raise ModelNotFoundError(f"{path}: checkpoint file not found")
        model_dict = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(model_dict, dict):
            raise TypeError(f"{path}: not a model dict ({type(model_dict).__name__})")
        return cls.from_model(model_dict, device, sha256=file_sha256(path), source=str(path))

    @classmethod
    def from_onnx(cls, path: str | Path, manifest_path: str | Path | None = None,
                  providers: list[str] | None = None, threads: int | None = None) -> Predictor:
        """From an exported ``.onnx`` file whose manifest SHA-256 must match the file."""
        path = Path(path)
        if not path.is_file():
            raise ModelNotFoundError(f"{path}: ONNX file not found")
        manifest = read_manifest(manifest_path or find_manifest(path))
        sha256 = verify_manifest(path, manifest)
        iterations = manifest.get("iterations")
        return cls(OnnxBackend(path, providers, threads), manifest["classes"], _version(
            sha256, None if iterations is None else int(iterations), str(path),
            (manifest.get("config") or {}).get("name")), manifest.get("category_ids"))

    @property
    def backend_name(self) -> str:
        return getattr(self.backend, "name", type(self.backend).__name__)

    def detect(self, image: np.ndarray, score_threshold: float = 0.5,
               mask_threshold: float = 0.5) -> Detections:
        """`Detections` of ``image`` uint8 [H, W, 3] RGB with score >= ``score_threshold``."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
        tensor = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32) / 255.0
        with self._lock:
            raw = self.backend(tensor)
        return _select(raw, image.shape[0], image.shape[1], score_threshold, mask_threshold)

    def predict(self, image: np.ndarray, score_threshold: float = 0.5,
                mask_threshold: float = 0.5, polygons: bool = False) -> list[dict]:
        """Instances of ``image`` uint8 [H, W, 3] as dicts (see `instance_dict`), best first."""
        found = self.detect(image, score_threshold, mask_threshold)
        return self.to_instances(found, polygons)

    def to_instances(self, found: Detections, polygons: bool = False) -> list[dict]:
        return [instance_dict(m, b, lab, s, self.classes, polygons)
                for m, b, lab, s in zip(found.masks, found.boxes, found.labels, found.scores)]

    def info(self) -> dict:
        """classes, version (``sha256:<hex>`` or ``iterations:<n>``), backend, device, ..."""
        return {"classes": dict(self.classes), "backend": self.backend_name,
                "device": getattr(self.backend, "device", "cpu"), **self.version}


def _version(sha256: str | None, iterations: int | None, source: str | None,
             model_name: str | None) -> dict:
    version = f"sha256:{sha256}" if sha256 else (
        f"iterations:{iterations}" if iterations is not None else "unknown")
    return {"version": version, "sha256": sha256, "iterations": iterations,
            "source": source, "model_name": model_name}


def load_predictor(checkpoint: str | Path | None = None, onnx: str | Path | None = None,
                   manifest: str | Path | None = None, device: str = "auto",
                   root: str | Path = ".", source_name: str | None = None,
                   threads: int | None = None) -> Predictor:
    """A predictor from ``onnx`` or ``checkpoint``, else the newest trained model under root.

    ``threads``: intra-op threads of the backend (None: the library's default, one per
    core; fewer helps where cores are shared, since idle threads spin and contend).
    """
    if checkpoint and onnx:
        raise ValueError("give a checkpoint or an ONNX file, not both")
    if onnx:
        return Predictor.from_onnx(onnx, manifest, threads=threads)
    path = Path(checkpoint) if checkpoint else find_latest_checkpoint(root, source_name)
    logger.info("loading model %s", path)
    return Predictor.from_checkpoint(path, device, threads)
