"""HTTP service: ``uvicorn instseg_pipeline.serving.api:app`` (or ``instseg-serve``).

The model is loaded once at startup from, in this order: $INSTSEG_ONNX (with its manifest,
$INSTSEG_MANIFEST to point elsewhere), $INSTSEG_CHECKPOINT, else the newest Kedro-versioned
``data/06_models/<source>/model.pt/<version>/model.pt`` under the working directory
($INSTSEG_SOURCE_NAME picks the source). $INSTSEG_SAM_CHECKPOINT and
$INSTSEG_SAM_MODEL_TYPE add a SAM model for prompts. Limits: $INSTSEG_MAX_UPLOAD_BYTES
(413 above it), $INSTSEG_MAX_PIXELS (413 above it, read from the header before decoding).
$INSTSEG_THREADS sets the backend's intra-op threads.

Inference runs on one dedicated thread, never on the event loop: the models are not
re-entrant, requests queue for that thread, and one thread (rather than whichever pool
thread is free) keeps the allocator from growing an arena per thread.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from instseg_pipeline.data.images import ImageProblem
from instseg_pipeline.data.masks import bitmap_to_rle, rle_area, rle_to_string
from instseg_pipeline.predict.predictor import Predictor, decode_upload, load_predictor
from instseg_pipeline.serving.interactive import (
    InteractiveResult,
    InteractiveSegmenter,
    PromptError,
    load_sam,
    parse_prompts,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000
FORM_OVERHEAD_BYTES = 64 * 1024  # multipart boundaries and small form fields
READ_CHUNK = 1 << 20
IMAGE_STATUS = {"too_many_pixels": 413, "empty_file": 415, "not_an_image": 415,
                "corrupt": 422}


# --- settings -----------------------------------------------------------------------------------

def _int_env(environ: Mapping, name: str, default: int) -> int:
    value = environ.get(name)
    try:
        return default if value in (None, "") else int(value)
    except ValueError:
        raise ValueError(f"${name} must be an integer, got {value!r}") from None


@dataclass
class ServiceSettings:
    """Where the model comes from and the request limits (see the module docstring)."""

    checkpoint: str | None = None
    onnx: str | None = None
    manifest: str | None = None
    device: str = "auto"
    root: str = "."
    source_name: str | None = None
    sam_checkpoint: str | None = None
    sam_model_type: str = "vit_b"
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    threads: int | None = None

    @classmethod
    def from_env(cls, environ: Mapping | None = None) -> ServiceSettings:
        env = os.environ if environ is None else environ
        return cls(checkpoint=env.get("INSTSEG_CHECKPOINT") or None,
                   onnx=env.get("INSTSEG_ONNX") or None,
                   manifest=env.get("INSTSEG_MANIFEST") or None,
                   device=env.get("INSTSEG_DEVICE", "auto"),
                   root=env.get("INSTSEG_ROOT", "."),
                   source_name=env.get("INSTSEG_SOURCE_NAME") or None,
                   sam_checkpoint=env.get("INSTSEG_SAM_CHECKPOINT") or None,
                   sam_model_type=env.get("INSTSEG_SAM_MODEL_TYPE", "vit_b"),
                   max_upload_bytes=_int_env(env, "INSTSEG_MAX_UPLOAD_BYTES",
                                             DEFAULT_MAX_UPLOAD_BYTES),
                   max_pixels=_int_env(env, "INSTSEG_MAX_PIXELS", DEFAULT_MAX_PIXELS),
                   threads=_int_env(env, "INSTSEG_THREADS", 0) or None)


# --- response models ----------------------------------------------------------------------------

class RLE(BaseModel):
    """COCO compressed run-length encoding of a full-size mask."""

    size: list[int] = Field(description="[height, width]")
    counts: str = Field(description="compressed RLE string (pycocotools)")


class Instance(BaseModel):
    label: int = Field(description="model label (1..K, 0 is background)")
    category_name: str
    score: float
    box: list[float] = Field(description="the detector's box [x1, y1, x2, y2] in pixels")
    bbox: list[float] = Field(description="COCO [x, y, width, height] of the mask in pixels "
                                          "(as in the evaluation's predictions table)")
    area: int = Field(description="mask area in pixels")
    rle: RLE
    polygon: list[list[float]] | None = Field(
        None, description="outer contours as COCO polygon parts [x1, y1, x2, y2, ...]; "
                          "only with include_polygons")


class ImageSize(BaseModel):
    width: int
    height: int


class ModelInfo(BaseModel):
    backend: Literal["torch", "onnxruntime"]
    device: str
    version: str = Field(description="sha256:<hex of the model file> or iterations:<n>")
    sha256: str | None = None
    iterations: int | None = None
    model_name: str | None = None
    classes: dict[int, str] = Field(description="model label -> category name")
    interactive_methods: list[Literal["sam", "model", "grabcut"]]


class Timing(BaseModel):
    decode: float = Field(description="upload decoding, milliseconds")
    inference: float = Field(description="model (and post-processing), milliseconds")
    total: float = Field(description="whole request inside the server, milliseconds")


class SegmentResponse(BaseModel):
    instances: list[Instance]
    image: ImageSize
    model: ModelInfo
    timing_ms: Timing


class PromptMask(BaseModel):
    score: float = Field(description="sam: predicted IoU; model: detection score; "
                                     "grabcut: fraction of the points the mask honours")
    label: int | None = Field(None, description="model label (method model only)")
    category_name: str | None = None
    box: list[float] = Field(description="[x1, y1, x2, y2] of the mask, pixels")
    bbox: list[float] = Field(description="COCO [x, y, width, height] of the mask")
    area: int
    rle: RLE


class InteractiveResponse(BaseModel):
    method: Literal["sam", "model", "grabcut"] = Field(description="which method answered")
    masks: list[PromptMask]
    image: ImageSize
    model: ModelInfo
    timing_ms: Timing


class Health(BaseModel):
    status: Literal["ok"]
    backend: str
    model_version: str


class ErrorResponse(BaseModel):
    detail: str


ERRORS = {413: {"model": ErrorResponse, "description": "upload or image too large"},
          415: {"model": ErrorResponse, "description": "empty upload or not an image"}}


# --- helpers ------------------------------------------------------------------------------------

class UploadLimitMiddleware:
    """Answers 413 from the Content-Length header, before the body is read."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            length = dict(scope["headers"]).get(b"content-length", b"")
            if length.isdigit() and int(length) > self.max_bytes + FORM_OVERHEAD_BYTES:
                response = JSONResponse(status_code=413, content={
                    "detail": f"request body of {int(length)} bytes exceeds the upload "
                              f"limit of {self.max_bytes} bytes"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _read_limited(upload: UploadFile, limit: int) -> bytes:
    chunks, size = [], 0
    while chunk := await upload.read(READ_CHUNK):
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"upload {upload.filename!r} exceeds the limit of "
                                     f"{limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _validation_error(field_name: str, message: str) -> HTTPException:
    """422 in FastAPI's own error shape, so one schema describes every 422."""
    return HTTPException(422, [{"loc": ["body", field_name], "msg": message,
                                "type": "value_error"}])


async def _decode(upload: UploadFile, settings: ServiceSettings) -> np.ndarray:
    data = await _read_limited(upload, settings.max_upload_bytes)
    try:
        return await run_in_threadpool(decode_upload, data, settings.max_pixels)
    except ImageProblem as exc:
        message = f"{upload.filename or 'upload'}: {exc}"
        if IMAGE_STATUS.get(exc.reason, 422) == 422:
            raise _validation_error("file", message) from None
        raise HTTPException(IMAGE_STATUS[exc.reason], message) from None


def _timing(start: float, decoded: float) -> dict:
    """Milliseconds spent decoding, in inference and in all since ``start``."""
    end = time.perf_counter()
    return {"decode": round((decoded - start) * 1e3, 3),
            "inference": round((end - decoded) * 1e3, 3), "total": round((end - start) * 1e3, 3)}


def _mask_entry(mask: np.ndarray, score: float, label, classes: Mapping) -> dict:
    rle = bitmap_to_rle(mask)
    ys, xs = np.nonzero(mask)
    box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)] \
        if len(xs) else [0.0, 0.0, 0.0, 0.0]
    return {"score": float(score), "label": label,
            "category_name": None if label is None else classes.get(label, str(label)),
            "box": box, "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
            "area": rle_area(rle), "rle": {"size": list(mask.shape),
                                           "counts": rle_to_string(rle)}}


@dataclass
class Service:
    """What the endpoints share: the loaded models and the settings."""

    settings: ServiceSettings
    predictor: Predictor
    interactive: InteractiveSegmenter
    executor: ThreadPoolExecutor

    def model_info(self) -> dict:
        return {**self.predictor.info(), "interactive_methods": self.interactive.methods}

    async def run(self, function, *args):
        """``function(*args)`` on the inference thread, awaited without blocking the loop."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)


def load_service(settings: ServiceSettings) -> Service:
    """Load the model (and SAM when configured); raises with a clear message when absent."""
    predictor = load_predictor(settings.checkpoint, settings.onnx, settings.manifest,
                               settings.device, settings.root, settings.source_name,
                               settings.threads)
    sam = load_sam(settings.sam_checkpoint, settings.sam_model_type, settings.device) \
        if settings.sam_checkpoint else None
    info = predictor.info()
    logger.info("serving %s model %s (%s); interactive: %s", info["backend"],
                info["version"], info["source"], "sam" if sam else "model + grabcut")
    return Service(settings, predictor, InteractiveSegmenter(predictor, sam),
                   ThreadPoolExecutor(1, thread_name_prefix="inference"))


def _service(request: Request) -> Service:
    return request.app.state.service


# --- the app ------------------------------------------------------------------------------------

def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    """The FastAPI app; ``settings`` default to the environment (`ServiceSettings.from_env`)."""
    settings = settings or ServiceSettings.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.service = await run_in_threadpool(load_service, settings)
        yield
        app.state.service.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="instseg-pipeline", version="0.1.0", lifespan=lifespan,
                  description="Instance segmentation of uploaded images with the project's "
                              "trained Mask R-CNN (torch or ONNX Runtime), plus prompt-based "
                              "(click / box) segmentation.")
    app.add_middleware(UploadLimitMiddleware, max_bytes=settings.max_upload_bytes)
    _add_routes(app)
    return app


def _add_routes(app: FastAPI) -> None:
    app.get("/health", response_model=Health, summary="Liveness and loaded model",
            description="200 once the model is loaded; names the backend and model version.")(
        health)
    app.get("/model", response_model=ModelInfo, summary="The served model",
            description="Classes (model label -> name), model version (SHA-256 of the model "
                        "file, or training iterations), backend, device and which methods "
                        "answer /segment_interactive.")(model)
    app.post("/segment", response_model=SegmentResponse, responses=ERRORS,
             summary="Segment every instance in an image",
             description="Multipart upload (field `file`). Returns the instances with score "
                         ">= score_threshold, best first, as full-size COCO RLE masks "
                         "(probability >= 0.5; an instance whose mask is empty is left out), "
                         "boxes and optional polygons. 413: upload over the byte limit or "
                         "image over the pixel limit (checked from the header); 415: empty or "
                         "not an image; "
                         "422: corrupt image data or invalid parameters.")(segment)
    app.post("/segment_interactive", response_model=InteractiveResponse, responses=ERRORS,
             summary="Segment the object under clicked points or a box",
             description="Multipart upload (field `file`) with form fields `points` (JSON "
                         "[[x, y], ...]), `labels` (JSON [1, 0, ...]: 1 = on the object, "
                         "0 = not) and optional `box` (JSON [x1, y1, x2, y2]). Answered by "
                         "SAM when configured, else by the trained model's instances under "
                         "the positive points, else by GrabCut seeded with the prompts; "
                         "`method` says which. 422: invalid prompts (bad JSON, wrong shape, "
                         "length mismatch, labels not 0/1, outside the image).")(
        segment_interactive)


async def health(request: Request) -> dict:
    info = _service(request).predictor.info()
    return {"status": "ok", "backend": info["backend"], "model_version": info["version"]}


async def model(request: Request) -> dict:
    return _service(request).model_info()


async def segment(
        request: Request,
        file: Annotated[UploadFile, File(description="the image (JPEG, PNG, TIFF, BMP, WebP, "
                                                     "...)")],
        score_threshold: Annotated[float | None, Form(
            ge=0.0, le=1.0, description="minimum score (default 0.5)")] = None,
        include_polygons: Annotated[bool | None, Form(
            description="add COCO polygons of the outer contours")] = None,
        score_threshold_query: Annotated[float | None, Query(
            alias="score_threshold", ge=0.0, le=1.0,
            description="same as the form field (the form field wins)")] = None,
        include_polygons_query: Annotated[bool | None, Query(
            alias="include_polygons", description="same as the form field")] = None,
) -> dict:
    service, start = _service(request), time.perf_counter()
    threshold = _first(score_threshold, score_threshold_query, 0.5)
    polygons = bool(_first(include_polygons, include_polygons_query, False))
    image = await _decode(file, service.settings)
    decoded = time.perf_counter()
    instances = await service.run(service.predictor.predict, image, threshold, 0.5, polygons)
    return {"instances": instances, "image": _size(image), "model": service.model_info(),
            "timing_ms": _timing(start, decoded)}


async def segment_interactive(
        request: Request,
        file: Annotated[UploadFile, File(description="the image")],
        points: Annotated[str, Form(description="JSON [[x, y], ...] in pixels")] = "[]",
        labels: Annotated[str, Form(description="JSON [1, 0, ...]: 1 on the object, 0 not")
                          ] = "[]",
        box: Annotated[str | None, Form(description="JSON [x1, y1, x2, y2] in pixels")] = None,
        score_threshold: Annotated[float, Form(
            ge=0.0, le=1.0, description="minimum score of trained-model instances")] = 0.5,
) -> dict:
    service, start = _service(request), time.perf_counter()
    try:
        prompts = parse_prompts(points, labels, box)
    except PromptError as exc:
        raise _validation_error(exc.field, str(exc)) from None
    image = await _decode(file, service.settings)
    decoded = time.perf_counter()
    try:
        result: InteractiveResult = await service.run(
            service.interactive.segment, image, prompts, score_threshold)
    except PromptError as exc:
        raise _validation_error(exc.field, str(exc)) from None
    classes = service.predictor.classes
    masks = [_mask_entry(m, s, lab, classes)
             for m, s, lab in zip(result.masks, result.scores, result.labels)]
    return {"method": result.method, "masks": masks, "image": _size(image),
            "model": service.model_info(),
            "timing_ms": _timing(start, decoded)}


def _first(*values):
    return next(v for v in values if v is not None)


def _size(image: np.ndarray) -> dict:
    return {"width": int(image.shape[1]), "height": int(image.shape[0])}


app = create_app()
