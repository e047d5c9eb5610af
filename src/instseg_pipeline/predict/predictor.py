"""One image in, instances out: a trained model (torch) or its ONNX export (onnxruntime).

`Predictor` runs the one inference path: `preprocess.to_chw`, a backend
(`backends.TorchBackend` or `backends.OnnxBackend`, same raw outputs), then
`postprocess.postprocess` (score >= threshold, mask probability >= threshold, empty masks
dropped, best first). An ONNX file is served only with the manifest written at export
(`export.manifest`), whose SHA-256 must match the file; the manifest's optional
``category_ids`` (model label -> dataset category id, identity when absent) is also read
from a trained model dict. A semantic (panoptic) model has ``stuff_category_ids`` (semantic
label 1..S -> stuff category id) and ``stuff_classes`` (semantic label -> name) in its model
dict or manifest; its predictor also returns the image's stuff segments
(`postprocess.stuff_segments`, cut as `PanopticOptions` say). Asked for the ONNX model of a
family that cannot be exported (its manifest says ``"exported": false``, and no graph
exists), `load_predictor` serves the newest trained model of that family with torch
instead and logs why.
"""
from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from instseg_pipeline.data.images import DEFAULT_MAX_PIXELS, ImageProblem, _to_rgb_array
from instseg_pipeline.export.manifest import (
    ManifestError,  # callers catch it from here too
    file_sha256,
    find_manifest,
    not_exported_reason,
    read_manifest,
    verify_manifest,
)
from instseg_pipeline.export.onnx import create_session
from instseg_pipeline.predict.backends import OnnxBackend, TorchBackend
from instseg_pipeline.predict.postprocess import (
    Detections,
    PanopticOptions,
    StuffSegments,
    instance_dicts,
    postprocess,
    stuff_dicts,
    stuff_segments,
)
from instseg_pipeline.predict.preprocess import to_chw

logger = logging.getLogger(__name__)

MODEL_DICT_KEYS = ("config", "state_dict", "classes")


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


# --- files ------------------------------------------------------------------------------------

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
            "(kedro run --pipelines training) or pass a checkpoint or an ONNX file")
    return found[-1]


# --- the predictor ----------------------------------------------------------------------------

class Predictor:
    """Instance segmentation of one image at a time; safe to call from several threads.

    Build with `from_checkpoint`, `from_model` or `from_onnx`. ``classes`` maps model
    labels to names; ``version`` names the weights (file SHA-256 or training iterations);
    ``category_ids`` maps labels to dataset category ids (identity when not saved).

    A semantic model is one given ``stuff_category_ids`` ({semantic label k: stuff category
    id}, possibly empty); ``stuff_classes`` ({k: name}) names them (the category id as
    text where a name is missing). ``panoptic`` sets how its stuff is cut out
    (`PanopticOptions`, defaults: the evaluation's). `segment` then returns its stuff
    segments beside the instances; an instance model returns an empty stuff list.
    """

    def __init__(self, backend: Callable[[np.ndarray], dict], classes: Mapping[int, str],
                 version: Mapping, category_ids: Mapping | None = None,
                 stuff_category_ids: Mapping | None = None,
                 stuff_classes: Mapping | None = None,
                 panoptic: PanopticOptions | None = None):
        self.backend = backend
        self.classes = {int(k): str(v) for k, v in classes.items()}
        self.category_ids = {int(k): int(v) for k, v in (category_ids or {}).items()} or {
            label: label for label in self.classes}
        self.semantic = stuff_category_ids is not None
        self.stuff_category_ids = {int(k): int(v) for k, v in
                                   (stuff_category_ids or {}).items()}
        names = {int(k): str(v) for k, v in (stuff_classes or {}).items()}
        # category id -> name: what the stuff segments of a response are named by
        self.stuff_categories = {cat: names.get(k, str(cat))
                                 for k, cat in sorted(self.stuff_category_ids.items())}
        self.panoptic = panoptic or PanopticOptions()
        self.version = dict(version)
        # torchvision models and onnxruntime sessions are not documented as re-entrant
        self._lock = threading.Lock()

    @classmethod
    def from_model(cls, model_dict: Mapping, device: str = "auto",
                   sha256: str | None = None, source: str | None = None,
                   panoptic: PanopticOptions | None = None) -> Predictor:
        """From ``{"config", "state_dict", "classes", "iterations"}`` (a training output;
        a semantic family's also holds ``stuff_category_ids`` and ``stuff_classes``)."""
        from instseg_pipeline.models import family, load_model

        missing = [k for k in MODEL_DICT_KEYS if k not in model_dict]
        if missing:
            raise ValueError(f"{source or 'model dict'}: missing keys {missing}; expected "
                             f"{list(MODEL_DICT_KEYS)} (+ iterations)")
        name = model_dict["config"].get("name")
        semantic = family(name).semantic if name else False
        if semantic and "stuff_category_ids" not in model_dict:
            raise ValueError(f"{source or 'model dict'}: a {name} model (a semantic family) "
                             "needs 'stuff_category_ids' (semantic label -> stuff category "
                             "id) and 'stuff_classes' (semantic label -> name)")
        model = load_model(model_dict["config"], model_dict["state_dict"])
        iterations = model_dict.get("iterations")
        return cls(TorchBackend(model, device), model_dict["classes"], _version(
            sha256, None if iterations is None else int(iterations), source, name),
            model_dict.get("category_ids"),
            model_dict["stuff_category_ids"] if semantic else None,
            model_dict.get("stuff_classes"), panoptic)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto",
                        threads: int | None = None,
                        panoptic: PanopticOptions | None = None) -> Predictor:
        """From a model file saved by `instseg_pipeline.kedro_ext.datasets.TorchModelDataset`.

        ``threads`` sets torch's intra-op threads for the whole process. The file is read
        with ``weights_only``: one holding pickled Python objects raises `UnsafeFileError`,
        a damaged one `UnreadableFileError` (both ``ValueError``, naming the file).
        """
        import torch

        from instseg_pipeline.models.torch_files import load_weights_only

        if threads:
            torch.set_num_threads(int(threads))
        path = Path(path)
        if not path.is_file():
            raise ModelNotFoundError(f"{path}: checkpoint file not found")
        # a user's file: tensors and plain containers only (UnsafeFileError otherwise)
        model_dict = load_weights_only(path, "model file")
        if not isinstance(model_dict, dict):
            raise TypeError(f"{path}: not a model dict ({type(model_dict).__name__})")
        return cls.from_model(model_dict, device, sha256=file_sha256(path), source=str(path),
                              panoptic=panoptic)

    @classmethod
    def from_onnx(cls, path: str | Path, manifest_path: str | Path | None = None,
                  providers: list[str] | None = None, threads: int | None = None,
                  panoptic: PanopticOptions | None = None) -> Predictor:
        """From an exported ``.onnx`` file whose manifest SHA-256 must match the file (a
        semantic model's manifest holds ``stuff_category_ids`` and ``stuff_classes``)."""
        path = Path(path)
        if not path.is_file():
            raise ModelNotFoundError(f"{path}: ONNX file not found")
        manifest = read_manifest(manifest_path or find_manifest(path))
        sha256 = verify_manifest(path, manifest)
        iterations = manifest.get("iterations")
        session = create_session(path, {"intra_op_num_threads": threads}, providers)
        return cls(OnnxBackend(session), manifest["classes"], _version(
            sha256, None if iterations is None else int(iterations), str(path),
            (manifest.get("config") or {}).get("name")), manifest.get("category_ids"),
            manifest.get("stuff_category_ids"), manifest.get("stuff_classes"), panoptic)

    @property
    def backend_name(self) -> str:
        return getattr(self.backend, "name", type(self.backend).__name__)

    def detect(self, image: np.ndarray, score_threshold: float = 0.5,
               mask_threshold: float = 0.5) -> Detections:
        """`Detections` of ``image`` uint8 [H, W, 3] RGB (rules: `postprocess`)."""
        tensor = to_chw(image)
        with self._lock:
            raw = self.backend(tensor)
        if self.semantic and raw.get("semantic") is None:
            raise ValueError(f"{self.version['source'] or 'the model'}: a semantic model (stuff "
                             f"categories {sorted(self.stuff_categories)}) whose "
                             f"{self.backend_name} outputs carry no 'semantic' map")
        return postprocess(raw, score_threshold, mask_threshold)

    def predict(self, image: np.ndarray, score_threshold: float = 0.5,
                mask_threshold: float = 0.5, polygons: bool = False) -> list[dict]:
        """Instances of ``image`` uint8 [H, W, 3] as dicts (`postprocess.instance_dicts`),
        best first."""
        return self.to_instances(self.detect(image, score_threshold, mask_threshold), polygons)

    def segment(self, image: np.ndarray, score_threshold: float = 0.5,
                mask_threshold: float = 0.5, polygons: bool = False) -> dict:
        """``{"instances": [...], "stuff": [...]}`` of ``image`` uint8 [H, W, 3]: the
        instances of `predict`, and the stuff segments of a semantic model
        (`to_stuff_dicts`; always an empty list for an instance model)."""
        found = self.detect(image, score_threshold, mask_threshold)
        return {"instances": self.to_instances(found, polygons),
                "stuff": self.to_stuff_dicts(self.stuff(found), polygons)}

    def to_instances(self, found: Detections, polygons: bool = False) -> list[dict]:
        return instance_dicts(found, self.classes, polygons)

    def stuff(self, found: Detections) -> StuffSegments:
        """The stuff segments of `detect`'s ``found`` (`postprocess.stuff_segments` with
        ``self.panoptic``); none for an instance model."""
        return stuff_segments(found, self.category_ids, self.stuff_category_ids, self.panoptic)

    def to_stuff_dicts(self, stuff: StuffSegments, polygons: bool = False) -> list[dict]:
        return stuff_dicts(stuff, self.stuff_categories, polygons)

    def info(self) -> dict:
        """classes, version (``sha256:<hex>`` or ``iterations:<n>``), backend, device,
        semantic and stuff_categories (category id -> name), ..."""
        return {"classes": dict(self.classes), "backend": self.backend_name,
                "device": getattr(self.backend, "device", "cpu"), "semantic": self.semantic,
                "stuff_categories": dict(self.stuff_categories), **self.version}


def _version(sha256: str | None, iterations: int | None, source: str | None,
             model_name: str | None) -> dict:
    version = f"sha256:{sha256}" if sha256 else (
        f"iterations:{iterations}" if iterations is not None else "unknown")
    return {"version": version, "sha256": sha256, "iterations": iterations,
            "source": source, "model_name": model_name}


def load_predictor(checkpoint: str | Path | None = None, onnx: str | Path | None = None,
                   manifest: str | Path | None = None, device: str = "auto",
                   root: str | Path = ".", source_name: str | None = None,
                   threads: int | None = None,
                   panoptic: PanopticOptions | None = None) -> Predictor:
    """A predictor from ``onnx`` or ``checkpoint``, else the newest trained model under root.

    ``threads``: intra-op threads of the backend (None: the library's default, one per
    core; fewer helps where cores are shared, since idle threads spin and contend).
    ``panoptic``: how a semantic model's stuff is cut out (default `PanopticOptions()`).
    """
    if checkpoint and onnx:
        raise ValueError("give a checkpoint or an ONNX file, not both")
    if onnx:
        torch_only = torch_only_manifest(onnx, manifest)
        if torch_only is None:
            return Predictor.from_onnx(onnx, manifest, threads=threads, panoptic=panoptic)
        return _torch_fallback(torch_only, device, root, source_name, threads, panoptic)
    path = Path(checkpoint) if checkpoint else find_latest_checkpoint(root, source_name)
    logger.info("loading model %s", path)
    return Predictor.from_checkpoint(path, device, threads, panoptic)


def torch_only_manifest(onnx: str | Path, manifest: str | Path | None = None) -> dict | None:
    """The manifest at ``manifest`` or beside ``onnx`` when it says the model has no ONNX
    graph (its family cannot be exported), else None (`Predictor.from_onnx` then reports
    a missing or bad file)."""
    try:
        path = Path(manifest) if manifest else find_manifest(onnx)
        found = json.loads(path.read_text(encoding="utf-8"))
    except (ManifestError, OSError, ValueError):
        return None
    return found if isinstance(found, dict) and not_exported_reason(found) else None


def _torch_fallback(manifest: Mapping, device: str, root: str | Path,
                    source_name: str | None, threads: int | None,
                    panoptic: PanopticOptions | None = None) -> Predictor:
    """The newest trained model under ``root``, served with torch, when it is of the
    torch-only ``manifest``'s family."""
    path = find_latest_checkpoint(root, source_name)
    logger.warning("%s; serving the newest trained model %s with the torch backend instead "
                   "of ONNX Runtime", not_exported_reason(manifest), path)
    predictor = Predictor.from_checkpoint(path, device, threads, panoptic)
    family = manifest.get("family")
    if family and predictor.version["model_name"] != family:
        raise ManifestError(f"the ONNX manifest is of a {family} model (not exportable), but "
                            f"the newest trained model {path} is a "
                            f"{predictor.version['model_name']}; pass the {family} model "
                            "file with --checkpoint")
    return predictor
