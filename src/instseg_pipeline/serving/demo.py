"""Gradio demo of the trained model (``instseg-demo``, `instseg_pipeline.commands.demo`).

Two tabs:

- **Segment**: an uploaded image comes back with its instances drawn on it (tinted masks,
  outlines, boxes and a "category score" tag, one colour per instance), a table of the
  instances (same colours, same order) and, folded away, their full JSON with COCO RLE
  masks. The handler is public for ``gradio_client`` as API name ``/segment``.
  A semantic (panoptic) model's stuff segments are drawn under the instances in muted
  colours (one per stuff category), named on the image, and listed in a second table
  (with their JSON): its ``/segment`` answers with those two outputs added.
  Images whose long side is under `MIN_DRAW_SIDE` pixels are drawn enlarged by a whole
  factor (`zoom_factor`, pixels repeated), so the tags stay legible.
- **Interactive**: clicks on the image add include / exclude points or box corners; the
  mask comes from `InteractiveSegmenter` (SAM when configured, else the trained model's
  instances under the points, else GrabCut) and the answer says which one replied.

Uploads are read as files and decoded with the service's policy (`decode_upload`: pixel
limit checked on the header, EXIF orientation applied), not by gradio.

Nothing here reaches outside the machine: gradio analytics and its version check are off
(``GRADIO_ANALYTICS_ENABLED=False`` from the package ``__init__``, which also makes gradio
turn off huggingface_hub telemetry), `launch_demo` refuses share links, server-side
rendering, MCP and PWA, the default theme's fonts are served locally, and the image
widgets offer no "share to Hugging Face" button.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import gradio as gr
import numpy as np

from instseg_pipeline.data.images import DEFAULT_MAX_PIXELS, ImageProblem
from instseg_pipeline.predict.postprocess import Detections, StuffSegments
from instseg_pipeline.predict.predictor import Predictor, decode_upload
from instseg_pipeline.serving.interactive import (
    MAX_PROMPT_POINTS,
    InteractiveResult,
    InteractiveSegmenter,
    PromptError,
    Prompts,
)
from instseg_pipeline.viz.overlays import _COLORS, inner_point, overlay_masks

logger = logging.getLogger(__name__)

# the palette `overlay_masks` tints with, as uint8 RGB, so tags match the tinted masks
PALETTE = np.round(_COLORS * 255).astype(np.uint8)
MIN_DRAW_SIDE, MAX_ZOOM = 640, 8
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
TABLE_HEADERS = ["#", "category", "score", "box x1, y1, x2, y2", "area (px)", "colour"]
STUFF_HEADERS = ["stuff category", "category id", "bbox x, y, w, h", "area (px)", "colour"]
# stuff: the instance palette halfway to grey, and a lighter tint, so things stand out
STUFF_PALETTE = np.round(0.5 * PALETTE + 0.5 * 128).astype(np.uint8)
STUFF_ALPHA = 0.35
INCLUDE, EXCLUDE, CORNER = "include point", "exclude point", "box corner"
PROMPT_MODES = [INCLUDE, EXCLUDE, CORNER]
PROMPT_LABELS = {INCLUDE: 1, EXCLUDE: 0}
INCLUDE_RGB, EXCLUDE_RGB, BOX_RGB = (40, 220, 60), (235, 30, 30), (255, 255, 255)
SCORE_MEANING = {"sam": "predicted IoU", "grabcut": "share of points honoured"}
# only the widgets' own buttons: "share" would post to Hugging Face
IMAGE_BUTTONS = ["download", "fullscreen"]


# --- examples -----------------------------------------------------------------------------------

def example_images(folder: str | Path | None, scratch: str | Path,
                   count: int = 3) -> list[Path]:
    """The first ``count`` images (by name) of ``folder``; when it is missing or holds none,
    ``count`` synthetic images are generated under ``scratch`` (which must outlive the demo).
    """
    found = _images_in(Path(folder)) if folder else []
    if found:
        return found[:count]
    if folder:
        logger.info("no example images in %s; generating %d synthetic ones", folder, count)
    return _synthetic_examples(Path(scratch) / "synthetic", count)


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _synthetic_examples(root: Path, count: int) -> list[Path]:
    from instseg_pipeline.data.sources.synthetic import generate

    # no empty scenes: an example should show something to segment
    generate(root, {"num_images": count, "empty_fraction": 0.0, "crowd_fraction": 0.0})
    return _images_in(root / "images")[:count]


# --- drawing ------------------------------------------------------------------------------------

def colour(k: int) -> tuple[int, int, int]:
    """uint8 RGB of the ``k``-th instance, the tint `overlay_masks` gives mask ``k``."""
    return tuple(int(v) for v in PALETTE[k % len(PALETTE)])


def hex_colour(k: int) -> str:
    return "#{:02x}{:02x}{:02x}".format(*colour(k))


def zoom_factor(shape: tuple[int, ...]) -> int:
    """Whole factor (1 to `MAX_ZOOM`) that brings the long side of an image of ``shape``
    [H, W, ...] up to `MIN_DRAW_SIDE`; 1 for images that are already large enough."""
    return int(np.clip(np.ceil(MIN_DRAW_SIDE / max(shape[:2])), 1, MAX_ZOOM))


def enlarge(array: np.ndarray, factor: int, axes: tuple[int, int] = (0, 1)) -> np.ndarray:
    """``array`` with each pixel repeated ``factor`` times along the two spatial ``axes``
    ((0, 1) for an image [H, W, 3], (1, 2) for masks [N, H, W])."""
    for axis in axes:
        array = np.repeat(array, factor, axis=axis)
    return array


def tint(image: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3]: ``image`` uint8 [H, W, 3] with masks uint8 [N, H, W] tinted in order."""
    blended = overlay_masks(image.astype(np.float32) / 255.0, masks)
    return np.clip(np.round(blended * 255.0), 0, 255).astype(np.uint8)


def _text_scale(shape: tuple[int, ...]) -> tuple[float, int]:
    """Font scale and stroke thickness that stay legible from small to large images."""
    side = min(shape[:2])
    return max(0.35, side / 700.0), max(1, round(side / 500))


def draw_tag(canvas: np.ndarray, text: str, x: float, y: float, rgb: tuple) -> None:
    """Write ``text`` on a filled ``rgb`` label whose top-left corner is near (x, y), in place.

    The label sits above the point when there is room, else below it, and never leaves
    ``canvas`` uint8 [H, W, 3].
    """
    scale, thickness = _text_scale(canvas.shape)
    (width, height), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    pad = max(1, thickness)
    box_h = height + baseline + 2 * pad
    left = int(np.clip(x, 0, max(canvas.shape[1] - width - 2 * pad, 0)))
    top = int(y) - box_h if y - box_h >= 0 else int(y)
    top = int(np.clip(top, 0, max(canvas.shape[0] - box_h, 0)))
    cv2.rectangle(canvas, (left, top), (left + width + 2 * pad, top + box_h), rgb, -1)
    # dark text on the light colours (yellow, cyan, lime), white on the others
    ink = (0, 0, 0) if np.dot(rgb, (0.299, 0.587, 0.114)) > 150 else (255, 255, 255)
    cv2.putText(canvas, text, (left + pad, top + pad + height), cv2.FONT_HERSHEY_SIMPLEX,
                scale, ink, thickness, cv2.LINE_AA)


def outline(canvas: np.ndarray, mask: np.ndarray, rgb: tuple) -> None:
    """Draw the outer contours of ``mask`` uint8 [H, W] on ``canvas`` in place."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(canvas, contours, -1, rgb, _text_scale(canvas.shape)[1], cv2.LINE_AA)


def stuff_colour(category_id: int) -> tuple[int, int, int]:
    """uint8 RGB of a stuff category: muted, and the same in every image."""
    return tuple(int(v) for v in STUFF_PALETTE[int(category_id) % len(STUFF_PALETTE)])


def stuff_hex_colour(category_id: int) -> str:
    return "#{:02x}{:02x}{:02x}".format(*stuff_colour(category_id))


def draw_stuff(canvas: np.ndarray, stuff: StuffSegments, names: Mapping[int, str],
               factor: int = 1) -> np.ndarray:
    """uint8 [zH, zW, 3]: ``canvas`` (the image enlarged by ``factor``) with each stuff
    segment of ``stuff`` (masks at the image size) lightly tinted in its category's muted
    `stuff_colour`, outlined, and named (``names``: category id -> name) at its
    `inner_point`."""
    masks = enlarge(stuff.masks, factor, (1, 2)).astype(bool)
    out = canvas.astype(np.float32)
    for mask, category_id in zip(masks, stuff.category_ids):
        out[mask] = (1 - STUFF_ALPHA) * out[mask] + STUFF_ALPHA * np.array(
            stuff_colour(category_id), np.float32)
    out = np.clip(np.round(out), 0, 255).astype(np.uint8)
    for mask, category_id in zip(masks, stuff.category_ids):
        outline(out, mask, stuff_colour(category_id))
    for mask, category_id in zip(masks, stuff.category_ids):
        x, y = inner_point(mask)
        draw_tag(out, names.get(int(category_id), str(int(category_id))), x, y,
                 stuff_colour(category_id))
    return out


def draw_instances(image: np.ndarray, found: Detections, classes: Mapping[int, str],
                   stuff: StuffSegments | None = None,
                   stuff_names: Mapping[int, str] | None = None) -> np.ndarray:
    """uint8 [zH, zW, 3], z = `zoom_factor`: ``image`` uint8 [H, W, 3] with each instance
    tinted, outlined, boxed and tagged "category score"; instance k has colour k. A
    semantic model's ``stuff`` goes underneath (`draw_stuff`, named by ``stuff_names``)."""
    factor = zoom_factor(image.shape)
    masks, boxes = enlarge(found.masks, factor, (1, 2)), found.boxes * factor
    base = enlarge(image, factor)
    if stuff is not None and len(stuff):
        base = draw_stuff(base, stuff, stuff_names or {}, factor)
    canvas = tint(base, masks)
    for k, (mask, box) in enumerate(zip(masks, boxes)):
        outline(canvas, mask, colour(k))
        x1, y1, x2, y2 = (round(float(v)) for v in box)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), colour(k), 1)
    # tags last, so no later outline crosses an earlier tag
    for k, (box, label, score) in enumerate(zip(boxes, found.labels, found.scores)):
        name = classes.get(int(label), str(int(label)))
        draw_tag(canvas, f"{name} {float(score):.2f}", float(box[0]), float(box[1]), colour(k))
    return canvas


def instance_rows(instances: Sequence[Mapping]) -> list[list]:
    """One table row per instance dict (`Predictor.predict` form), headed by `TABLE_HEADERS`."""
    return [[k, inst["category_name"], round(inst["score"], 3),
             ", ".join(f"{v:.0f}" for v in inst["box"]), inst["area"], hex_colour(k)]
            for k, inst in enumerate(instances)]


def stuff_rows(stuff: Sequence[Mapping]) -> list[list]:
    """One table row per stuff dict (`Predictor.segment` form), headed by `STUFF_HEADERS`:
    the legend of the muted colours on the overlay."""
    return [[segment["category_name"], segment["category_id"],
             ", ".join(f"{v:.0f}" for v in segment["bbox"]), segment["area"],
             stuff_hex_colour(segment["category_id"])] for segment in stuff]


# --- uploads ------------------------------------------------------------------------------------

def read_upload(path: str | Path | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """uint8 RGB [H, W, 3] of an uploaded file; `gr.Error` (shown to the user) when unusable."""
    if not path:
        raise gr.Error("Upload an image first.")
    try:
        return decode_upload(Path(path).read_bytes(), max_pixels)
    except ImageProblem as exc:
        raise gr.Error(f"{Path(path).name}: {exc}") from None


# --- segment tab --------------------------------------------------------------------------------

def segment(predictor: Predictor, image: np.ndarray,
            score_threshold: float) -> tuple[np.ndarray, list[list], list[dict]]:
    """Overlay uint8 [zH, zW, 3], table rows and instance dicts of ``image`` uint8 [H, W, 3]
    (a semantic model's stuff drawn too: `segment_panoptic` also lists it)."""
    return segment_panoptic(predictor, image, score_threshold)[:3]


def segment_panoptic(predictor: Predictor, image: np.ndarray, score_threshold: float
                     ) -> tuple[np.ndarray, list[list], list[dict], list[list], list[dict]]:
    """Overlay uint8 [zH, zW, 3], instance table rows, instance dicts, stuff table rows and
    stuff dicts of ``image`` uint8 [H, W, 3] (no stuff for an instance model)."""
    found = predictor.detect(image, float(score_threshold))
    instances = predictor.to_instances(found)
    stuff = predictor.stuff(found)
    stuff_dicts = predictor.to_stuff_dicts(stuff)
    logger.info("segment: %dx%d image, %d instances at score >= %.2f, %d stuff segments",
                image.shape[1], image.shape[0], len(instances), score_threshold, len(stuff))
    overlay = draw_instances(image, found, predictor.classes, stuff,
                             predictor.stuff_categories)
    return (overlay, instance_rows(instances), instances, stuff_rows(stuff_dicts),
            stuff_dicts)


# --- interactive tab ----------------------------------------------------------------------------

def empty_prompts() -> dict:
    """The clicks so far: points [[x, y], ...], labels [1 | 0, ...], corners [[x, y], ...]."""
    return {"points": [], "labels": [], "corners": []}


def add_click(state: Mapping, x: float, y: float, mode: str) -> dict:
    """A new prompt state with the click at pixel (x, y) added as ``mode`` (a `PROMPT_MODES`).

    A box takes two corner clicks; a third corner starts a new box. Points stop at the API's
    limit (`interactive.MAX_PROMPT_POINTS`): each one costs every later answer.
    """
    state = {key: list(value) for key, value in (state or empty_prompts()).items()}
    if mode in PROMPT_LABELS and len(state["points"]) >= MAX_PROMPT_POINTS:
        raise gr.Error(f"at most {MAX_PROMPT_POINTS} prompt points; press Clear points to "
                       "start again")
    if mode == CORNER:
        state["corners"] = (state["corners"] if len(state["corners"]) < 2 else []) + [[x, y]]
    elif mode in PROMPT_LABELS:
        state["points"].append([x, y])
        state["labels"].append(PROMPT_LABELS[mode])
    else:
        raise gr.Error(f"unknown click mode {mode!r}; choose one of {PROMPT_MODES}")
    return state



def state_box(state: Mapping) -> np.ndarray | None:
    """float32 [4] x1, y1, x2, y2 of two corner clicks, None until there are two with area."""
    if len(state["corners"]) != 2:
        return None
    (ax, ay), (bx, by) = state["corners"]
    box = np.array([min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)], np.float32)
    return box if box[2] > box[0] and box[3] > box[1] else None


def state_prompts(state: Mapping) -> Prompts | None:
    """`Prompts` of the clicks; None while there is neither an include point nor a box."""
    points = np.asarray(state["points"], np.float32).reshape(-1, 2)
    prompts = Prompts(points, np.asarray(state["labels"], np.int64), state_box(state))
    return prompts if prompts.box is not None or len(prompts.positive) else None


def draw_prompts(canvas: np.ndarray, state: Mapping, factor: int = 1) -> None:
    """Draw the clicks on ``canvas`` uint8 [zH, zW, 3] (z = ``factor``) in place: include
    points green, exclude points red (white rims), the box (or its first corner) white."""
    radius = max(3, round(min(canvas.shape[:2]) / 80))

    def at(x: float, y: float) -> tuple[int, int]:  # a pixel's centre on the enlarged canvas
        return int((x + 0.5) * factor), int((y + 0.5) * factor)

    box = state_box(state)
    if box is not None:
        cv2.rectangle(canvas, at(*box[:2]), at(*box[2:]), BOX_RGB, max(1, radius // 3))
    for x, y in state["corners"][len(state["corners"]) // 2 * 2:]:  # an unpaired corner
        cv2.drawMarker(canvas, at(x, y), BOX_RGB, cv2.MARKER_CROSS, 3 * radius, 2)
    for (x, y), label in zip(state["points"], state["labels"]):
        centre = at(x, y)
        cv2.circle(canvas, centre, radius + 1, (255, 255, 255), -1, cv2.LINE_AA)
        cv2.circle(canvas, centre, radius, INCLUDE_RGB if label else EXCLUDE_RGB, -1,
                   cv2.LINE_AA)


def shown_masks(result: InteractiveResult) -> np.ndarray:
    """uint8 [M, H, W] to draw: SAM's candidates are alternatives (best first), so only the
    best; the model's are distinct instances, so all."""
    return result.masks[:1] if result.method == "sam" else result.masks


def describe(result: InteractiveResult, classes: Mapping[int, str]) -> str:
    """One line: who answered, how many masks, and per mask its category and score (model)
    or what its score means (sam, grabcut)."""
    meaning = SCORE_MEANING.get(result.method, "score")
    parts = [f"{classes.get(label, label) if label is not None else meaning} {score:.2f}"
             for label, score in zip(result.labels, result.scores.tolist())]
    shown = "best of " if result.method == "sam" and len(parts) > 1 else ""
    return f"{result.method}: {shown}{len(parts)} mask(s): " + ", ".join(parts)


def answer_prompts(segmenter: InteractiveSegmenter, image: np.ndarray, state: Mapping,
                   score_threshold: float) -> tuple[np.ndarray, str]:
    """Overlay uint8 [zH, zW, 3] (z = `zoom_factor`) of the prompted mask(s) and the clicks,
    and a one-line answer."""
    prompts, factor = state_prompts(state), zoom_factor(image.shape)
    if prompts is None:
        canvas = enlarge(image, factor)
        draw_prompts(canvas, state, factor)
        return canvas, "waiting: add an include point or both corners of a box"
    try:
        result = segmenter.segment(image, prompts, float(score_threshold))
    except PromptError as exc:
        raise gr.Error(str(exc)) from None
    masks = enlarge(shown_masks(result), factor, (1, 2))
    canvas = tint(enlarge(image, factor), masks)
    for k, mask in enumerate(masks):
        outline(canvas, mask, colour(k))
    draw_prompts(canvas, state, factor)
    classes = segmenter.predictor.classes if segmenter.predictor is not None else {}
    logger.info("interactive: %s", describe(result, classes))
    return canvas, describe(result, classes)


# --- the app ------------------------------------------------------------------------------------

def model_summary(predictor: Predictor, segmenter: InteractiveSegmenter) -> str:
    """Markdown line naming the model, its classes and who answers clicks."""
    info = predictor.info()
    classes = ", ".join(f"{k}: {v}" for k, v in sorted(info["classes"].items()))
    stuff = ", ".join(f"{k}: {v}" for k, v in sorted(info["stuff_categories"].items()))
    return (f"**Model** `{info['version'][:23]}` ({info['backend']} on {info['device']}) · "
            f"**classes** {classes} · "
            + (f"**stuff categories** {stuff} · " if info["semantic"] else "")
            + f"**clicks answered by** {' / '.join(segmenter.methods)}")


def _threshold_slider(value: float) -> gr.Slider:
    return gr.Slider(0.0, 1.0, value=value, step=0.01, label="Score threshold",
                     info="Instances scoring below this are not shown. Lower it to see more "
                          "(and less certain) instances.")


def _segment_tab(predictor: Predictor, examples: list[Path], threshold: float,
                 max_pixels: int) -> None:
    with gr.Row():
        with gr.Column():
            image = gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"],
                             buttons=IMAGE_BUTTONS, elem_id="segment-input",
                             placeholder="Drop an image here or click to upload (PNG, JPEG, "
                                         "TIFF, BMP, WebP)")
            slider = _threshold_slider(threshold)
            run = gr.Button("Segment", variant="primary", elem_id="segment-run")
            gr.Markdown("Press **Segment** to detect every instance in the image.")
        with gr.Column():
            overlay = gr.Image(type="numpy", format="png", label="Instances", interactive=False,
                               buttons=IMAGE_BUTTONS, elem_id="segment-overlay")
    table = gr.Dataframe(headers=TABLE_HEADERS, label="Instances, best first (row # = colour "
                         "on the image)", interactive=False, elem_id="segment-table")
    with gr.Accordion("Instances as JSON (boxes xyxy / COCO bbox, COCO RLE masks)", open=False):
        details = gr.JSON(label="Instances")
    outputs = [overlay, table, details]
    if predictor.semantic:
        outputs += _stuff_outputs()
    if examples:
        gr.Examples([[str(p)] for p in examples], inputs=[image], label="Example images "
                    "(synthetic shapes): click one, then Segment")

    def run_segment(path: str | None, score_threshold: float):
        answer = segment_panoptic(predictor, read_upload(path, max_pixels), score_threshold)
        return answer if predictor.semantic else answer[:3]

    run.click(run_segment, [image, slider], outputs, api_name="segment",
              api_description="Instances of an image: overlay, table rows and instance dicts"
                              + ("; then stuff table rows and stuff dicts"
                                 if predictor.semantic else ""))


def _stuff_outputs() -> list:
    """The stuff table (the legend of the muted colours) and the stuff JSON of a semantic
    model's Segment tab."""
    table = gr.Dataframe(headers=STUFF_HEADERS, label="Stuff segments (muted colours under "
                         "the instances; the pixels the instances leave free)",
                         interactive=False, elem_id="segment-stuff-table")
    with gr.Accordion("Stuff segments as JSON (COCO bbox, COCO RLE masks)", open=False):
        details = gr.JSON(label="Stuff segments")
    return [table, details]


def _interactive_tab(segmenter: InteractiveSegmenter, examples: list[Path], threshold: float,
                     max_pixels: int) -> None:
    state = gr.State(empty_prompts())
    with gr.Row():
        with gr.Column():
            image = gr.Image(type="filepath", label="Image: click to add prompts",
                             sources=["upload", "clipboard"], buttons=IMAGE_BUTTONS,
                             elem_id="interactive-input",
                             placeholder="Upload an image, then click on an object")
            mode = gr.Radio(PROMPT_MODES, value=INCLUDE, label="A click adds",
                            info="include point: part of the object; exclude point: not part "
                                 "of it; box corner: two clicks make a box around the object")
            slider = _threshold_slider(threshold)
            clear = gr.Button("Clear points", elem_id="interactive-clear")
            gr.Markdown("**Clear points** removes every point and box corner.")
        with gr.Column():
            overlay = gr.Image(type="numpy", format="png", label="Mask", interactive=False,
                               buttons=IMAGE_BUTTONS, elem_id="interactive-overlay")
            answer = gr.Textbox(label="Answered by", interactive=False,
                                info="sam: Segment Anything; model: the trained model's "
                                     "instance under the points; grabcut: OpenCV GrabCut "
                                     "where the model found none", elem_id="interactive-answer")
    if examples:
        gr.Examples([[str(p)] for p in examples], inputs=[image], label="Example images")

    def on_click(path: str | None, clicks: dict, how: str, score: float, evt: gr.SelectData):
        picture = read_upload(path, max_pixels)
        clicks = add_click(clicks, float(evt.index[0]), float(evt.index[1]), how)
        return (clicks, *answer_prompts(segmenter, picture, clicks, score))

    def reset():
        return empty_prompts(), None, ""

    image.select(on_click, [image, state, mode, slider], [state, overlay, answer],
                 api_visibility="private")
    for event in (image.change, clear.click):
        event(reset, None, [state, overlay, answer], api_visibility="private")


def build_demo(predictor: Predictor, segmenter: InteractiveSegmenter,
               examples: Sequence[str | Path] = (), score_threshold: float = 0.5,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> gr.Blocks:
    """The two-tab demo (see the module docstring); ``examples`` are image files offered in
    both tabs; ``score_threshold`` is the sliders' start value."""
    examples = [Path(p) for p in examples]
    with gr.Blocks(title="Instance segmentation demo", analytics_enabled=False) as demo:
        title = "Panoptic segmentation" if predictor.semantic else "Instance segmentation"
        gr.Markdown(f"# {title}\n" + model_summary(predictor, segmenter))
        with gr.Tab("Segment", elem_id="tab-segment"):
            _segment_tab(predictor, examples, score_threshold, max_pixels)
        with gr.Tab("Interactive", elem_id="tab-interactive"):
            _interactive_tab(segmenter, examples, score_threshold, max_pixels)
    return demo


def launch_demo(demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860,
                max_file_size: int | None = None) -> str:
    """Start serving ``demo`` in the background and return its local URL.

    Offline by construction: no share link, no server-side rendering (Node), no MCP server,
    no PWA, no monitoring endpoint, nothing printed (the URL is logged).
    """
    demo.queue(default_concurrency_limit=1)  # the models are not re-entrant anyway
    _, url, _ = demo.launch(server_name=host, server_port=port, share=False, ssr_mode=False,
                            mcp_server=False, pwa=False, enable_monitoring=False, quiet=True,
                            inbrowser=False, prevent_thread_lock=True,
                            max_file_size=max_file_size, footer_links=["api"])
    logger.info("demo running on %s", url)
    return url
