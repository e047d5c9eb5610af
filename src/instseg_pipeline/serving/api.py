"""HTTP service: ``uvicorn instseg_pipeline.serving.api:app`` (or ``instseg-serve``).

The model is loaded once at startup from, in this order: $INSTSEG_ONNX (with its manifest,
$INSTSEG_MANIFEST to point elsewhere), $INSTSEG_CHECKPOINT, else the newest Kedro-versioned
``data/06_models/<source>/model.pt/<version>/model.pt`` under the working directory
($INSTSEG_SOURCE_NAME picks the source). $INSTSEG_SAM_CHECKPOINT and
$INSTSEG_SAM_MODEL_TYPE add a SAM model for prompts. Limits: $INSTSEG_MAX_UPLOAD_BYTES
(413 above it, from Content-Length or, for a chunked body, while it streams in),
$INSTSEG_MAX_PIXELS (413 above it, read from the header before decoding),
$INSTSEG_MAX_QUEUE (503 with Retry-After when that many requests already wait for the
model), $INSTSEG_MAX_POINTS (422 above that many prompt points).
$INSTSEG_THREADS sets the backend's intra-op threads. For a semantic (panoptic) model,
$INSTSEG_STUFF_MIN_AREA and $INSTSEG_OVERLAP_THRESHOLD set how its stuff segments are cut
out (`predict.postprocess.PanopticOptions`; defaults: the evaluation's in conf/base).

Inference runs on one dedicated thread, never on the event loop: the models are not
re-entrant, requests queue for that thread, and one thread (rather than whichever pool
thread is free) keeps the allocator from growing an arena per thread. The queue is bounded:
at most 1 + max_queue requests are admitted to /segment and /segment_interactive at once
(counted from their arrival, upload and decoding included, so that a refused request costs
no reading and memory stays below (1 + max_queue) x (upload limit + decoded pixel limit));
others get 503 at once. /health and /model are never queued.
"""
from __future__ import annotations

import asyncio
import logging
import math
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
from instseg_pipeline.predict.postprocess import PanopticOptions
from instseg_pipeline.predict.predictor import Predictor, decode_upload, load_predictor
from instseg_pipeline.serving.docs import add_docs
from instseg_pipeline.serving.interactive import (
    MAX_PROMPT_POINTS,
    InteractiveResult,
    InteractiveSegmenter,
    PromptError,
    load_sam,
    parse_prompts,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000
# 8 waiting requests of ~0.5 s CPU inference keep the worst wait near 5 s; beyond that a
# client is better told to come back than left holding a connection and an image
DEFAULT_MAX_QUEUE = 8
QUEUED_PATHS = frozenset({"/segment", "/segment_interactive"})
RUN_SECONDS_SMOOTHING = 0.2  # weight of the newest inference time in the running mean
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


def _float_env(environ: Mapping, name: str, default: float) -> float:
    value = environ.get(name)
    try:
        return default if value in (None, "") else float(value)
    except ValueError:
        raise ValueError(f"${name} must be a number, got {value!r}") from None


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
    max_queue: int = DEFAULT_MAX_QUEUE
    max_points: int = MAX_PROMPT_POINTS
    stuff_min_area: int = PanopticOptions.stuff_min_area
    overlap_threshold: float = PanopticOptions.overlap_threshold

    def __post_init__(self):
        # checked here so the environment and the command line fail the same way
        for name, option, minimum in (("max_queue", "INSTSEG_MAX_QUEUE / --max-queue", 0),
                                      ("max_points", "INSTSEG_MAX_POINTS / --max-points", 1)):
            if getattr(self, name) < minimum:
                raise ValueError(f"{name} (${option}) must be >= {minimum}, "
                                 f"got {getattr(self, name)}")
        try:
            self.panoptic_options()
        except ValueError as exc:
            raise ValueError(f"$INSTSEG_STUFF_MIN_AREA / $INSTSEG_OVERLAP_THRESHOLD: "
                             f"{exc}") from None

    def panoptic_options(self) -> PanopticOptions:
        """How a semantic model's stuff is cut out (ignored by instance models)."""
        return PanopticOptions(overlap_threshold=self.overlap_threshold,
                               stuff_min_area=self.stuff_min_area)

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
                   threads=_int_env(env, "INSTSEG_THREADS", 0) or None,
                   max_queue=_int_env(env, "INSTSEG_MAX_QUEUE", DEFAULT_MAX_QUEUE),
                   max_points=_int_env(env, "INSTSEG_MAX_POINTS", MAX_PROMPT_POINTS),
                   stuff_min_area=_int_env(env, "INSTSEG_STUFF_MIN_AREA",
                                           PanopticOptions.stuff_min_area),
                   overlap_threshold=_float_env(env, "INSTSEG_OVERLAP_THRESHOLD",
                                                PanopticOptions.overlap_threshold))


# --- response models ----------------------------------------------------------------------------

class RLE(BaseModel):
    """COCO compressed run-length encoding of a full-size mask."""

    size: list[int] = Field(description="[height, width]")
    counts: str = Field(description="compressed RLE string (pycocotools)")


class Instance(BaseModel):
    """One detected object (a thing), best score first."""

    label: int = Field(description="model label (1..K, 0 is background)")
    category_name: str = Field(description="name of the label's category (the model's "
                                           "classes)")
    score: float = Field(description="detection score in [0, 1]")
    box: list[float] = Field(description="the detector's box [x1, y1, x2, y2] in pixels")
    bbox: list[float] = Field(description="COCO [x, y, width, height] of the mask in pixels "
                                          "(as in the evaluation's predictions table)")
    area: int = Field(description="mask area in pixels")
    rle: RLE = Field(description="the full-size mask (probability >= 0.5) as COCO RLE; "
                                 "instances may overlap one another")
    polygon: list[list[float]] | None = Field(
        None, description="outer contours as COCO polygon parts [x1, y1, x2, y2, ...]; "
                          "only with include_polygons")


class StuffSegment(BaseModel):
    """One amorphous region (sky, road, grass, ...) of a semantic (panoptic) model."""

    category_id: int = Field(description="dataset category id of the stuff category (as in "
                                         "the categories table, isthing false)")
    category_name: str = Field(description="name of the stuff category")
    bbox: list[float] = Field(description="COCO [x, y, width, height] of the segment in "
                                          "pixels")
    area: int = Field(description="segment area in pixels")
    rle: RLE = Field(description="the full-size segment as COCO RLE; segments never overlap "
                                 "each other nor the pixels the instances claim in the "
                                 "panoptic merge")
    polygon: list[list[float]] | None = Field(
        None, description="outer contours as COCO polygon parts [x1, y1, x2, y2, ...] (the "
                          "holes instances leave are not in them; the RLE is exact); only "
                          "with include_polygons")


class ImageSize(BaseModel):
    width: int = Field(description="pixels, after EXIF orientation")
    height: int = Field(description="pixels, after EXIF orientation")


class ModelInfo(BaseModel):
    backend: Literal["torch", "onnxruntime"] = Field(description="what runs the model")
    device: str = Field(description="cpu or cuda[:N]")
    version: str = Field(description="sha256:<hex of the model file> or iterations:<n>")
    sha256: str | None = Field(None, description="SHA-256 of the model file, when read "
                                                 "from one")
    iterations: int | None = Field(None, description="training iterations of the weights, "
                                                     "when saved")
    model_name: str | None = Field(None, description="model family (training.model.name)")
    classes: dict[int, str] = Field(description="model label -> category name")
    semantic: bool = Field(False, description="true for a semantic (panoptic) model, whose "
                                              "/segment answers also carry stuff segments")
    stuff_categories: dict[int, str] = Field(
        default_factory=dict, description="stuff category id -> name (empty for an instance "
                                          "model)")
    interactive_methods: list[Literal["sam", "model", "grabcut"]] = Field(
        description="who may answer /segment_interactive, first available first")


class Timing(BaseModel):
    """Where the time of a request went."""

    decode: float = Field(description="upload decoding, milliseconds")
    inference: float = Field(description="model (and post-processing), milliseconds")
    total: float = Field(description="whole request inside the server, milliseconds")


class SegmentResponse(BaseModel):
    instances: list[Instance] = Field(description="objects with score >= score_threshold, "
                                                  "best first")
    stuff: list[StuffSegment] = Field(
        default_factory=list,
        description="a semantic model's stuff segments, by category (always present; an "
                    "empty list for an instance model, see model.semantic): the pixels of "
                    "each stuff category that the panoptic merge of the returned instances "
                    "left free (instances paint best first, one more than overlap_threshold "
                    "covered by better ones claims nothing), kept when at least "
                    "stuff_min_area pixels; the instance list itself is not cut")
    image: ImageSize = Field(description="size of the decoded image")
    model: ModelInfo = Field(description="the model that answered")
    timing_ms: Timing = Field(description="server-side timing")


class PromptMask(BaseModel):
    score: float = Field(description="sam: predicted IoU; model: detection score; "
                                     "grabcut: fraction of the points the mask honours")
    label: int | None = Field(None, description="model label (method model only)")
    category_name: str | None = Field(None, description="name of the label's category "
                                                        "(method model only)")
    box: list[float] = Field(description="[x1, y1, x2, y2] of the mask, pixels")
    bbox: list[float] = Field(description="COCO [x, y, width, height] of the mask")
    area: int = Field(description="mask area in pixels")
    rle: RLE = Field(description="the full-size mask as COCO RLE")


class InteractiveResponse(BaseModel):
    method: Literal["sam", "model", "grabcut"] = Field(description="which method answered")
    masks: list[PromptMask] = Field(description="sam: candidates, best first; model: the "
                                                "instances under the points; grabcut: one")
    image: ImageSize = Field(description="size of the decoded image")
    model: ModelInfo = Field(description="the model that answered")
    timing_ms: Timing = Field(description="server-side timing")


class Health(BaseModel):
    status: Literal["ok"] = Field(description="ok once the model is loaded")
    backend: str = Field(description="torch or onnxruntime")
    model_version: str = Field(description="sha256:<hex of the model file> or "
                                           "iterations:<n>")


class ErrorResponse(BaseModel):
    detail: str = Field(description="what was wrong, naming the upload or field")


ERRORS = {413: {"model": ErrorResponse, "description": "upload or image too large"},
          415: {"model": ErrorResponse, "description": "empty upload or not an image"},
          503: {"model": ErrorResponse,
                "description": "the model's queue is full (max_queue requests already "
                               "wait); answered at once, without reading the upload",
                "headers": {"Retry-After": {
                    "description": "seconds after which the queue is expected to have "
                                   "room (the mean inference time x requests admitted)",
                    "schema": {"type": "integer"}}}}}


# --- helpers ------------------------------------------------------------------------------------

class UploadLimitMiddleware:
    """Answers 413 from the Content-Length header, before the body is read; a body without
    one (Transfer-Encoding: chunked) is counted as it streams in and refused with 413 as
    soon as it passes the limit, before the form parser spools it."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes + FORM_OVERHEAD_BYTES
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            response = JSONResponse(status_code=413, content={
                "detail": f"request body of {int(length)} bytes exceeds the upload "
                          f"limit of {self.max_bytes} bytes"})
            await response(scope, receive, send)
            return
        await self.app(scope, _counted(receive, limit, self.max_bytes), send)


def _counted(receive, limit: int, max_bytes: int):
    """``receive`` that raises 413 once more than ``limit`` body bytes came in. FastAPI
    re-raises an HTTPException met while reading the form, so the answer is the usual JSON
    413 and the parser's spooled file is closed."""
    received = 0

    async def receive_counted():
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise HTTPException(413, f"request body passed {received} bytes, over the "
                                         f"upload limit of {max_bytes} bytes (chunked "
                                         "upload refused while streaming)")
        return message

    return receive_counted


class QueueLimitMiddleware:
    """Admits at most ``1 + max_queue`` requests to the model endpoints (`QUEUED_PATHS`)
    at once; the next gets 503 with Retry-After and a JSON error at once, its body unread.

    One counter on the event loop (no lock needed: it is only touched between awaits).
    A slot is held from arrival to the last byte of the response, so uploads and decoded
    images in memory are bounded along with the wait.
    """

    def __init__(self, app, max_queue: int):
        self.app = app
        self.max_queue = max_queue
        self.admitted = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in QUEUED_PATHS \
                or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        if self.admitted > self.max_queue:
            await self._refuse(scope, receive, send)
            return
        self.admitted += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.admitted -= 1

    async def _refuse(self, scope, receive, send) -> None:
        service = getattr(scope["app"].state, "service", None)
        seconds = retry_after_seconds(service.mean_run_seconds if service else 1.0,
                                      self.admitted)
        logger.warning("queue full (%d admitted, max_queue %d): 503 for %s, retry after %d s",
                       self.admitted, self.max_queue, scope["path"], seconds)
        response = JSONResponse(status_code=503, headers={"Retry-After": str(seconds)},
                                content={"detail": f"the model's queue is full: "
                                                   f"{self.admitted - 1} requests waiting "
                                                   f"(max_queue {self.max_queue}); retry "
                                                   f"after {seconds} s"})
        await response(scope, receive, send)


def retry_after_seconds(mean_run_seconds: float, admitted: int) -> int:
    """Whole seconds (>= 1) until ``admitted`` requests of ``mean_run_seconds`` each are
    through the single model worker."""
    return max(1, math.ceil(mean_run_seconds * admitted))


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
    mean_run_seconds: float = 1.0  # running mean of one inference; sizes Retry-After

    def model_info(self) -> dict:
        return {**self.predictor.info(), "interactive_methods": self.interactive.methods}

    async def run(self, function, *args):
        """``function(*args)`` on the inference thread, awaited without blocking the loop."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._timed,
                                                                function, *args)

    def _timed(self, function, *args):
        start = time.perf_counter()
        try:
            return function(*args)
        finally:
            self.mean_run_seconds += RUN_SECONDS_SMOOTHING * (
                time.perf_counter() - start - self.mean_run_seconds)


def load_service(settings: ServiceSettings) -> Service:
    """Load the model (and SAM when configured); raises with a clear message when absent."""
    predictor = load_predictor(settings.checkpoint, settings.onnx, settings.manifest,
                               settings.device, settings.root, settings.source_name,
                               settings.threads, settings.panoptic_options())
    sam = load_sam(settings.sam_checkpoint, settings.sam_model_type, settings.device) \
        if settings.sam_checkpoint else None
    info = predictor.info()
    logger.info("serving %s model %s (%s)%s; interactive: %s", info["backend"],
                info["version"], info["source"],
                f", semantic with stuff {sorted(predictor.stuff_categories.values())}"
                if predictor.semantic else "", "sam" if sam else "model + grabcut")
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

    # docs_url/redoc_url off: FastAPI's own pages load Swagger UI / ReDoc from a CDN and stay
    # blank offline; /docs is served from the packaged assets instead (serving/docs.py)
    app = FastAPI(title="instseg-pipeline", version="0.1.0", lifespan=lifespan,
                  docs_url=None, redoc_url=None,
                  description="Instance segmentation of uploaded images with the project's "
                              "trained model (torch or ONNX Runtime; a Panoptic FPN model "
                              "also returns stuff segments), plus prompt-based (click / box) "
                              "segmentation.")
    # added last is outermost: an oversize upload gets its 413 without taking a queue slot
    app.add_middleware(QueueLimitMiddleware, max_queue=settings.max_queue)
    app.add_middleware(UploadLimitMiddleware, max_bytes=settings.max_upload_bytes)
    _add_routes(app)
    add_docs(app)
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
                         "boxes and optional polygons; a semantic (panoptic) model also "
                         "returns its stuff segments with their category names (`stuff`: "
                         "the pixels the returned instances leave free, as the evaluation's "
                         "panoptic merge cuts them; empty for an instance model). 413: "
                         "upload over the byte limit or image over the pixel limit (checked "
                         "from the header); 415: empty or not an image; 422: corrupt image "
                         "data or invalid parameters; 503 (with Retry-After): max_queue "
                         "requests already wait for the model.")(segment)
    app.post("/segment_interactive", response_model=InteractiveResponse, responses=ERRORS,
             summary="Segment the object under clicked points or a box",
             description="Multipart upload (field `file`) with form fields `points` (JSON "
                         "[[x, y], ...]), `labels` (JSON [1, 0, ...]: 1 = on the object, "
                         "0 = not) and optional `box` (JSON [x1, y1, x2, y2]). Answered by "
                         "SAM when configured, else by the trained model's instances under "
                         "the positive points, else by GrabCut seeded with the prompts; "
                         "`method` says which. At most max_points points (default "
                         f"{MAX_PROMPT_POINTS}) and one box. 422: invalid prompts (bad "
                         "JSON, wrong shape, length mismatch, labels not 0/1, outside the "
                         "image, more points than max_points); 503 (with Retry-After): "
                         "max_queue requests already wait for the model.")(
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
    found = await service.run(service.predictor.segment, image, threshold, 0.5, polygons)
    return {**found, "image": _size(image), "model": service.model_info(),
            "timing_ms": _timing(start, decoded)}


async def segment_interactive(
        request: Request,
        file: Annotated[UploadFile, File(description="the image")],
        points: Annotated[str, Form(description="JSON [[x, y], ...] in pixels; at most "
                                                "max_points ($INSTSEG_MAX_POINTS, "
                                                f"default {MAX_PROMPT_POINTS}) pairs")] = "[]",
        labels: Annotated[str, Form(description="JSON [1, 0, ...]: 1 on the object, 0 not; "
                                                "one per point")] = "[]",
        box: Annotated[str | None, Form(description="JSON [x1, y1, x2, y2] in pixels; one "
                                                    "box")] = None,
        score_threshold: Annotated[float, Form(
            ge=0.0, le=1.0, description="minimum score of trained-model instances")] = 0.5,
) -> dict:
    service, start = _service(request), time.perf_counter()
    try:
        prompts = parse_prompts(points, labels, box, service.settings.max_points)
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
