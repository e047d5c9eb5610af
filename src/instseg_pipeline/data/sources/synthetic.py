"""Deterministic synthetic shapes in COCO format: the default source, so a fresh clone runs.

`generate(root, params)` writes ``root/images/NNNNNN.png``, ``root/annotations.json``
(COCO instances; each image's ``file_name`` is relative to ``root/images``, as in COCO) and
a COCO panoptic export of the same scenes: ``root/panoptic.json`` and
``root/panoptic/NNNNNN.png``. The same parameters give byte-identical files; a second call
with the same parameters finds the parameter hash in ``info`` and does nothing. `read`
ingests it: the instances from ``annotations.json`` (the COCO reader), the stuff segments
from the panoptic export (the COCO panoptic reader).

What the scenes hold, and why:
- four shape classes (circle, rectangle, triangle, star) with a random hue per instance,
  so colour never gives the class away;
- two stuff classes behind them (``stuff: true``, the default): "sky" above and "ground"
  below a tilted, wavy horizon at a random height, each with its own tint and texture
  (sky: light, smooth, brightening toward the horizon; ground: darker and grainy), so a
  semantic head must learn them from appearance and place. They are drawn from a random
  stream of their own, so the shapes, their annotations and their pixels are the same as
  with ``stuff: false``, which paints the older noisy, textured background instead;
- overlaps with real occlusion: later shapes hide earlier ones, each mask is the visible
  part only, and an instance with fewer than `MIN_VISIBLE_PIXELS` visible is left out of
  the scene altogether (not drawn, not annotated);
- touching same-class pairs (two rectangles sharing an edge) that must stay two instances;
- crowd regions: a cluster of tiny shapes of one class, one ``iscrowd=1`` annotation with
  an uncompressed RLE, the form real COCO crowd annotations take;
- empty images, and image sides drawn independently (varied sizes and aspect ratios).

Segmentation encoding: non-crowd instances are COCO polygons traced from the visible mask
(outer contours, pushed half a pixel outwards so pycocotools' rasteriser returns the traced
pixels; exact on axis-aligned edges, so touching rectangles stay touching). A visible mask
with a hole (a small shape lying on top of a bigger one) cannot be a polygon list, so it is
written as a compressed RLE string instead; that also gives readers all three COCO forms.
Polygon rasterisation still differs from the traced mask by a pixel here and there, so the
image is painted from the annotation masks as pycocotools decodes them: pixels and labels
agree by construction (neighbours may share a boundary pixel; the upper one is painted).

Panoptic export (COCO panoptic format, ids ``R + 256 G + 256^2 B``, 0 = void): each pixel
belongs to what was painted last there, so the segments never overlap. A thing segment
(crowds included, ``iscrowd`` 1) has the id of its annotation in ``annotations.json`` and
covers the pixels of its mask that no upper annotation took; a stuff segment
(``STUFF_SEGMENT_BASE + category_id``, so never an annotation id) covers the sky or ground
pixels no thing covers. Categories: the things 1..4 (``isthing`` 1), then sky 5 and
ground 6 (``isthing`` 0; absent with ``stuff: false``, when every background pixel is void).
"""
from __future__ import annotations

import colorsys
import hashlib
import json
import logging
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from instseg_pipeline.data.config import SyntheticConfig
from instseg_pipeline.data.masks import (
    bitmap_to_rle,
    id_to_rgb,
    rle_area,
    rle_bbox,
    rle_to_string,
)

if TYPE_CHECKING:
    from instseg_pipeline.data.config import SourceConfig
    from instseg_pipeline.data.quality import QualityReport
    from instseg_pipeline.data.sources import SourceTables

logger = logging.getLogger(__name__)

GENERATOR = "instseg_pipeline.data.sources.synthetic"
# Bump when the drawing code changes, so cached datasets written by older code are redone.
GENERATOR_VERSION = 2
CATEGORY_NAMES = ("circle", "rectangle", "triangle", "star")
STUFF_NAMES = ("sky", "ground")         # category ids len(CATEGORY_NAMES) + 1, + 2
RECTANGLE_ID = CATEGORY_NAMES.index("rectangle") + 1
MIN_VISIBLE_PIXELS = 20
# Random streams of image i: (seed, THINGS_STREAM, i) for the shapes and the finish,
# (seed, STUFF_STREAM, i) for sky and ground; (seed, 0) plans the images.
THINGS_STREAM, STUFF_STREAM = 1, 2
# Stuff segment ids in the panoptic PNGs: above every annotation id, below 2**24.
STUFF_SEGMENT_BASE = 2**24 - 256
ANNOTATIONS_JSON = "annotations.json"
IMAGE_DIR = "images"
PANOPTIC_JSON = "panoptic.json"
PANOPTIC_DIR = "panoptic"
DEFAULTS = asdict(SyntheticConfig())  # the schema of source.synthetic holds them


@dataclass
class Layer:
    """One thing drawn into an image, bottom to top.

    footprint: bool [H, W], the pixels it covers when nothing lies above it.
    colours: float32 [K, 3] RGB; piece_ids: int16 [H, W] index into `colours` (crowds,
    whose tiny shapes each have their own colour), or None for a one-colour object.
    """

    category_id: int
    iscrowd: bool
    footprint: np.ndarray
    colours: np.ndarray
    piece_ids: np.ndarray | None = None


@dataclass
class RenderedImage:
    """One image as drawn, with what its panoptic PNG needs.

    pixels: uint8 [H, W, 3] RGB; annotations: COCO fields without ids, bottom to top;
    owner: int16 [H, W], k > 0 where annotation k (1-based) was painted last, 0 elsewhere;
    stuff: uint8 [H, W] stuff category id of every pixel (sky or ground), or None when the
    scene has no stuff.
    """

    pixels: np.ndarray
    annotations: list[dict]
    owner: np.ndarray
    stuff: np.ndarray | None


@dataclass
class ImagePlan:
    """Size and kind of one image, fixed before any drawing."""

    height: int
    width: int
    empty: bool
    crowd: bool
    touching: bool


# ---------------------------------------------------------------------------- parameters

def resolve_params(params: dict | None) -> dict:
    """Defaults filled in and checked; raises ValueError naming the offending key."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"synthetic: unknown parameter(s) {unknown}; known: {sorted(DEFAULTS)}")
    resolved = {**DEFAULTS, **params}
    _check_params(resolved)
    # 0 and 0.0 must hash alike, or an equal configuration would regenerate the dataset.
    return {key: float(v) if key.endswith("_fraction") else v for key, v in resolved.items()}


def _check_params(p: dict) -> None:
    for key in ("seed", "num_images", "min_size", "max_size", "max_objects"):
        if isinstance(p[key], bool) or not isinstance(p[key], int) or p[key] < 0:
            raise ValueError(f"synthetic: {key} must be a non-negative integer, not {p[key]!r}")
    for key in ("empty_fraction", "crowd_fraction", "touching_fraction"):
        if not 0.0 <= float(p[key]) <= 1.0:
            raise ValueError(f"synthetic: {key} must lie in [0, 1], not {p[key]!r}")
    if p["num_images"] < 1 or p["max_objects"] < 1:
        raise ValueError("synthetic: num_images and max_objects must be at least 1")
    if not 64 <= p["min_size"] <= p["max_size"]:
        raise ValueError(f"synthetic: need 64 <= min_size <= max_size, got "
                         f"{p['min_size']} and {p['max_size']}")
    if p["touching_fraction"] > 0 and p["max_objects"] < 2:
        raise ValueError("synthetic: touching pairs need max_objects >= 2")
    if type(p["stuff"]) is not bool:  # 0 and 1 are not switches
        raise ValueError(f"synthetic: stuff must be true or false, not {p['stuff']!r}")
    # an image holds at most max_objects shapes and one crowd: annotation ids stay below
    # the stuff segment ids of the panoptic PNGs
    if p["num_images"] * (p["max_objects"] + 1) >= STUFF_SEGMENT_BASE:
        raise ValueError(f"synthetic: num_images * (max_objects + 1) must stay below "
                         f"{STUFF_SEGMENT_BASE}, got {p['num_images']} and {p['max_objects']}")


def params_hash(params: dict) -> str:
    """sha256 hex of the resolved parameters and the generator version."""
    text = json.dumps({"params": resolve_params(params), "version": GENERATOR_VERSION},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------------------- entry point

def generate(root: str | Path, params: dict | None = None) -> dict:
    """Write (or reuse) the synthetic COCO dataset under `root`; return its manifest.

    Parameters (all optional, defaults in `DEFAULTS`):
        seed (0): the only source of randomness; image i (from 0) draws from the stream
            (seed, 1, i), the image plan from (seed, 0).
        num_images (120): images written, ids 1..num_images.
        min_size, max_size (160, 256): height and width are drawn independently in this
            range (inclusive), so sizes and aspect ratios vary.
        max_objects (6): a non-empty image holds 1..max_objects shapes (before occlusion).
        empty_fraction (0.08): share of images drawn with nothing in them.
        crowd_fraction (0.1): share of images that also get one crowd region.
        touching_fraction (0.15): share of images with two rectangles sharing an edge.
        stuff (True): sky and ground behind the shapes (their own stream (seed, 2, i)),
            stuff segments in the panoptic export; False: the plain background, and
            the export holds the things only. The things are the same either way.
    Shares are exact counts (rounded), assigned to images by a seeded permutation.

    Returns {"num_images", "num_annotations", "num_crowd", "num_empty_images",
    "num_categories" (things and stuff), "num_stuff_segments", "seed", "params_hash"}.
    `root` is replaced whole when it holds an older dataset of this generator; any other
    non-empty folder is refused. The dataset is written to a temporary folder beside
    `root` and renamed into place, so an interrupted run leaves either the previous
    dataset or none (a killed process may leave a hidden
    ``.<root name>.tmp-*`` folder beside `root`, never a partial `root`).
    """
    root = Path(root)
    p = resolve_params(params)
    digest = params_hash(p)
    existing = _existing_manifest(root, digest)
    if existing is not None:
        logger.info("synthetic dataset at %s is up to date (params hash %s); nothing to do",
                    root, digest[:12])
        return existing
    _check_replaceable(root)
    start = time.perf_counter()
    coco, panoptic = _write_atomically(root, p, digest)
    manifest = _manifest(coco, panoptic)
    logger.info("wrote synthetic dataset to %s in %.2f s: %s", root,
                time.perf_counter() - start, manifest)
    return manifest


def _manifest(coco: dict, panoptic: dict) -> dict:
    anns = coco["annotations"]
    with_anns = {a["image_id"] for a in anns}
    info = coco["info"]
    stuff = {c["id"] for c in panoptic["categories"] if not c["isthing"]}
    return {"num_images": len(coco["images"]), "num_annotations": len(anns),
            "num_crowd": sum(a["iscrowd"] for a in anns),
            "num_empty_images": sum(im["id"] not in with_anns for im in coco["images"]),
            "num_categories": len(panoptic["categories"]),
            "num_stuff_segments": sum(s["category_id"] in stuff for a in panoptic["annotations"]
                                      for s in a["segments_info"]),
            "seed": info["params"]["seed"], "params_hash": info["params_hash"]}


# ---------------------------------------------------------------------------- files

def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        logger.warning("synthetic: cannot read %s (%s); regenerating", path, exc)
        return None


def _read_coco(root: Path) -> dict | None:
    return _read_json(root / ANNOTATIONS_JSON)


def _missing_files(folder: Path, names: list[str]) -> bool:
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        logger.warning("synthetic: %d file(s) missing under %s (first: %s); regenerating",
                       len(missing), folder, missing[0])
    return bool(missing)


def _existing_manifest(root: Path, digest: str) -> dict | None:
    coco = _read_coco(root)
    if coco is None or coco.get("info", {}).get("params_hash") != digest:
        return None
    panoptic = _read_json(root / PANOPTIC_JSON)
    if panoptic is None or panoptic.get("info", {}).get("params_hash") != digest:
        logger.warning("synthetic: %s missing or stale; regenerating", root / PANOPTIC_JSON)
        return None
    if _missing_files(root / IMAGE_DIR, [im["file_name"] for im in coco["images"]]) or \
            _missing_files(root / PANOPTIC_DIR,
                           [a["file_name"] for a in panoptic["annotations"]]):
        return None
    return _manifest(coco, panoptic)


def _check_replaceable(root: Path) -> None:
    if not root.exists():
        return
    if not root.is_dir():
        raise FileExistsError(f"synthetic: {root} exists and is not a folder")
    coco = _read_coco(root)
    ours = coco is not None and coco.get("info", {}).get("generator") == GENERATOR
    if not ours and any(root.iterdir()):
        raise FileExistsError(f"synthetic: {root} is not empty and holds no dataset written "
                              f"by this generator; refusing to replace it")


def _write_atomically(root: Path, p: dict, digest: str) -> tuple[dict, dict]:
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.tmp-"))
    try:
        written = _write_dataset(tmp, p, digest)
        _swap_into_place(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return written


def _swap_into_place(tmp: Path, root: Path) -> None:
    if not root.exists():
        tmp.rename(root)
        return
    old = root.with_name(f".{root.name}.old-{uuid.uuid4().hex[:8]}")
    root.rename(old)
    tmp.rename(root)
    shutil.rmtree(old, ignore_errors=True)


def _write_png(path: Path, image: np.ndarray) -> None:
    """Write uint8 RGB [H, W, 3] as PNG (OpenCV wants BGR)."""
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f"synthetic: OpenCV could not write {path}")


def _write_dataset(folder: Path, p: dict, digest: str) -> tuple[dict, dict]:
    """Render every image into `folder`; annotations.json goes last, as the completion
    mark. Returns the COCO instances and the COCO panoptic json."""
    for name in (IMAGE_DIR, PANOPTIC_DIR):
        (folder / name).mkdir()
    images, annotations, segments = [], [], []
    for index, plan in enumerate(_plan_images(p)):
        image_id = index + 1
        stuff_rng = np.random.default_rng([p["seed"], STUFF_STREAM, index]) \
            if p["stuff"] else None
        drawn = render_image(np.random.default_rng([p["seed"], THINGS_STREAM, index]), plan,
                             p["max_objects"], stuff_rng)
        file_name = f"{image_id:06d}.png"
        _write_png(folder / IMAGE_DIR / file_name, drawn.pixels)
        images.append({"id": image_id, "file_name": file_name,
                       "width": plan.width, "height": plan.height})
        ids = [len(annotations) + k for k in range(1, len(drawn.annotations) + 1)]
        annotations += [{"id": ann_id, "image_id": image_id, **ann}
                        for ann_id, ann in zip(ids, drawn.annotations)]
        id_map, info = panoptic_segments(drawn, ids)
        _write_png(folder / PANOPTIC_DIR / file_name, id_to_rgb(id_map))
        segments.append({"image_id": image_id, "file_name": file_name, "segments_info": info})
    categories = _categories()
    panoptic = {"info": _info(p, digest), "licenses": [], "images": images,
                "annotations": segments,
                "categories": [{**c, "isthing": 1} for c in categories]
                + (_stuff_categories() if p["stuff"] else [])}
    (folder / PANOPTIC_JSON).write_text(json.dumps(panoptic, separators=(",", ":")))
    coco = {"info": _info(p, digest), "licenses": [], "images": images,
            "annotations": annotations, "categories": categories}
    (folder / ANNOTATIONS_JSON).write_text(json.dumps(coco, separators=(",", ":")))
    return coco, panoptic


def _info(p: dict, digest: str) -> dict:
    return {"description": "synthetic shapes for instance segmentation",
            "generator": GENERATOR, "version": GENERATOR_VERSION,
            "params": p, "params_hash": digest}


def _categories() -> list[dict]:
    return [{"id": i + 1, "name": name, "supercategory": "shape"}
            for i, name in enumerate(CATEGORY_NAMES)]


def _stuff_categories() -> list[dict]:
    return [{"id": stuff_category_id(name), "name": name, "supercategory": "scene",
             "isthing": 0} for name in STUFF_NAMES]


def stuff_category_id(name: str) -> int:
    """Category id of a stuff class: after the things (sky 5, ground 6)."""
    return len(CATEGORY_NAMES) + STUFF_NAMES.index(name) + 1


# ---------------------------------------------------------------------------- panoptic

def _segment_info(segment_id: int, category_id: int, mask: np.ndarray, iscrowd: int) -> dict:
    rle = bitmap_to_rle(mask)
    return {"id": segment_id, "category_id": category_id, "iscrowd": iscrowd,
            "area": rle_area(rle), "bbox": rle_bbox(rle)}


def panoptic_segments(drawn: RenderedImage, ann_ids: list[int]) -> tuple[np.ndarray, list]:
    """int32 [H, W] segment ids of one image (0 = void) and its segments_info.

    ``ann_ids``: the annotation id of each of ``drawn.annotations``, which become the thing
    segment ids; stuff segments take ``STUFF_SEGMENT_BASE + category_id``. A segment left
    with no pixel (covered whole by upper ones) is not listed.
    """
    lookup = np.array([0, *ann_ids], np.int32)
    id_map = lookup[drawn.owner]
    info = []
    for segment_id, ann in zip(ann_ids, drawn.annotations):
        mask = id_map == segment_id
        if mask.any():
            info.append(_segment_info(segment_id, ann["category_id"], mask, ann["iscrowd"]))
    if drawn.stuff is not None:
        for name in STUFF_NAMES:
            category_id = stuff_category_id(name)
            mask = (drawn.stuff == category_id) & (drawn.owner == 0)
            if mask.any():
                id_map[mask] = STUFF_SEGMENT_BASE + category_id
                info.append(_segment_info(STUFF_SEGMENT_BASE + category_id, category_id,
                                          mask, 0))
    return id_map, info


# ---------------------------------------------------------------------------- planning

def _share(fraction: float, n: int) -> int:
    return int(np.floor(fraction * n + 0.5))


def _plan_images(p: dict) -> list[ImagePlan]:
    """Sizes and kinds of every image; kinds are exact shares over a seeded permutation."""
    rng = np.random.default_rng([p["seed"], 0])
    n = p["num_images"]
    sizes = rng.integers(p["min_size"], p["max_size"] + 1, size=(n, 2))
    order = rng.permutation(n)
    n_empty = _share(p["empty_fraction"], n)
    empty, rest = set(order[:n_empty].tolist()), order[n_empty:]
    crowd = set(rest[:_share(p["crowd_fraction"], n)].tolist())
    touching = set(rng.permutation(rest)[:_share(p["touching_fraction"], n)].tolist())
    return [ImagePlan(int(sizes[i, 0]), int(sizes[i, 1]), i in empty, i in crowd,
                      i in touching) for i in range(n)]


# ---------------------------------------------------------------------------- drawing

def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """float32 [3] RGB in 0..255: any hue, saturated enough to stand off the background."""
    rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0))
    return np.array(rgb, dtype=np.float32) * 255


def _draw_shape(canvas: np.ndarray, name: str, centre: np.ndarray, scale: float,
                rng: np.random.Generator, value: int = 1) -> None:
    """Fill one shape of class `name` and size about `scale` px (a radius) into `canvas`."""
    cx, cy = (int(round(v)) for v in centre)  # noqa: RUF046 - numpy scalars
    if name == "circle":
        cv2.circle(canvas, (cx, cy), max(1, int(round(scale))), value, -1)  # noqa: RUF046
        return
    if name == "rectangle":
        hw, hh = scale * rng.uniform(0.5, 1.2, size=2)
        corners = np.array([[cx - hw, cy - hh], [cx + hw, cy + hh]]).round().astype(int)
        cv2.rectangle(canvas, tuple(corners[0]), tuple(corners[1]), value, -1)
        return
    cv2.fillPoly(canvas, [_star_or_triangle(name, centre, scale, rng)], value)


def _star_or_triangle(name: str, centre: np.ndarray, scale: float,
                      rng: np.random.Generator) -> np.ndarray:
    """int32 [K, 2] vertices: a jittered triangle, or a five-pointed star."""
    rotation = rng.uniform(0, 2 * np.pi)
    if name == "triangle":
        angles = rotation + np.arange(3) * 2 * np.pi / 3 + rng.uniform(-0.35, 0.35, 3)
        radii = scale * rng.uniform(0.85, 1.2, 3)
    else:
        angles = rotation + np.arange(10) * np.pi / 5
        radii = scale * np.tile([1.15, rng.uniform(0.4, 0.55)], 5)
    points = centre + np.stack([np.cos(angles), np.sin(angles)], axis=1) * radii[:, None]
    return points.round().astype(np.int32)


def _object_layer(rng: np.random.Generator, height: int, width: int) -> Layer:
    category_id = int(rng.integers(len(CATEGORY_NAMES))) + 1
    side = min(height, width)
    centre = rng.uniform([0.05 * width, 0.05 * height], [0.95 * width, 0.95 * height])
    canvas = np.zeros((height, width), np.uint8)
    _draw_shape(canvas, CATEGORY_NAMES[category_id - 1], centre,
                side * rng.uniform(0.07, 0.18), rng)
    return Layer(category_id, False, canvas.astype(bool), _random_colour(rng)[None])


def _touching_pair(rng: np.random.Generator, height: int, width: int) -> list[Layer]:
    """Two rectangles sharing (part of) one edge, in clearly different hues."""
    side = min(height, width)
    (w1, h1), (w2, h2) = rng.integers(int(0.12 * side), int(0.3 * side), size=(2, 2))
    if rng.random() < 0.5:  # side by side, the second shifted down by up to half the first
        dy = int(rng.integers(0, h1 // 2 + 1))
        x0 = rng.integers(0, width - w1 - w2)
        y0 = rng.integers(0, height - max(h1, dy + h2))
        boxes = [(x0, y0, w1, h1), (x0 + w1, y0 + dy, w2, h2)]
    else:  # stacked, the second shifted right by up to half the first
        dx = int(rng.integers(0, w1 // 2 + 1))
        x0 = rng.integers(0, width - max(w1, dx + w2))
        y0 = rng.integers(0, height - h1 - h2)
        boxes = [(x0, y0, w1, h1), (x0 + dx, y0 + h1, w2, h2)]
    hue = rng.random()
    return [_box_layer(box, (hue + 0.5 * k) % 1.0, rng, height, width)
            for k, box in enumerate(boxes)]


def _box_layer(box: tuple, hue: float, rng: np.random.Generator, height: int,
               width: int) -> Layer:
    x, y, w, h = box
    footprint = np.zeros((height, width), bool)
    footprint[y:y + h, x:x + w] = True
    rgb = colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))
    return Layer(RECTANGLE_ID, False, footprint, np.array(rgb, np.float32)[None] * 255)


def _crowd_layer(rng: np.random.Generator, height: int, width: int) -> Layer:
    """A cluster of 15-40 tiny shapes of one class, each in its own colour."""
    category_id = int(rng.integers(len(CATEGORY_NAMES))) + 1
    side = min(height, width)
    centre = rng.uniform([0.2 * width, 0.2 * height], [0.8 * width, 0.8 * height])
    radius = side * rng.uniform(0.1, 0.18)
    count = int(rng.integers(15, 41))
    piece_ids = np.zeros((height, width), np.int16)
    for k in range(1, count + 1):
        offset = rng.normal(0, radius / 2, size=2)
        _draw_shape(piece_ids, CATEGORY_NAMES[category_id - 1], centre + offset,
                    rng.uniform(2.0, 4.5), rng, value=k)
    colours = np.stack([_random_colour(rng) for _ in range(count + 1)])
    return Layer(category_id, True, piece_ids > 0, colours, piece_ids)


def _scene(rng: np.random.Generator, plan: ImagePlan, max_objects: int) -> list[Layer]:
    """Layers bottom to top: crowd (if any), random shapes, touching pair (if any) on top."""
    if plan.empty:
        return []
    layers = [_crowd_layer(rng, plan.height, plan.width)] if plan.crowd else []
    count = int(rng.integers(1, max_objects + 1))
    if plan.touching:
        count = max(count, 2) - 2
    layers += [_object_layer(rng, plan.height, plan.width) for _ in range(count)]
    if plan.touching:
        layers += _touching_pair(rng, plan.height, plan.width)
    return layers


# ---------------------------------------------------------------------------- occlusion

def _visible(layers: list[Layer], shape: tuple[int, int]) -> list[np.ndarray]:
    """bool [H, W] per layer: its pixels not covered by any later layer."""
    top = np.zeros(shape, np.int16)
    for index, layer in enumerate(layers):
        top[layer.footprint] = index + 1
    return [top == index + 1 for index in range(len(layers))]


def _drop_hidden(layers: list[Layer], shape: tuple[int, int]) -> list[Layer]:
    """Remove layers with < MIN_VISIBLE_PIXELS visible; removal only uncovers the others."""
    visible = _visible(layers, shape)
    return [layer for layer, vis in zip(layers, visible) if vis.sum() >= MIN_VISIBLE_PIXELS]


# ---------------------------------------------------------------------------- encoding

def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE of bool [H, W]: column-major run lengths, zeros first."""
    flat = mask.ravel(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts.insert(0, 0)
    return {"size": list(mask.shape), "counts": counts}


def _push_outwards(points: np.ndarray, distance: float = 0.5) -> np.ndarray:
    """Offset a closed polygon float [K, 2] outwards by `distance`, with mitred corners.

    Contours run through boundary pixel centres; pycocotools rasterises a polygon by pixel
    centres, so the traced polygon loses its right and bottom rows. Half a pixel outwards
    puts the edges on the pixel borders instead.
    """
    doubled_area = np.sum(points[:, 0] * np.roll(points[:, 1], -1)
                          - np.roll(points[:, 0], -1) * points[:, 1])
    sign = 1.0 if doubled_area > 0 else -1.0
    normals = []
    for edges in (points - np.roll(points, 1, axis=0), np.roll(points, -1, axis=0) - points):
        n = np.stack([edges[:, 1], -edges[:, 0]], axis=1) * sign
        normals.append(n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-9))
    # Clamp the mitre: a spike (edges folding back) would otherwise shoot off to infinity.
    cosine = np.maximum(1.0 + np.sum(normals[0] * normals[1], axis=1), 0.5)[:, None]
    return points + distance * (normals[0] + normals[1]) / cosine


def _polygons(contours: list[np.ndarray], height: int, width: int) -> list[list[float]]:
    """COCO polygon parts from OpenCV contours; parts with < 3 points are skipped."""
    parts = []
    for contour in contours:
        if len(contour) < 3:
            continue
        points = _push_outwards(contour.reshape(-1, 2).astype(np.float64))
        points = np.clip(points, 0, [width, height]).round(2)
        parts.append([float(v) for v in points.ravel()])
    return parts


def encode_instance(visible: np.ndarray) -> tuple[list | dict | None, np.ndarray | None]:
    """Segmentation and the mask it decodes to (bool [H, W]) for one visible mask.

    Polygons when the mask has no hole, else a compressed RLE string; (None, None) when
    nothing usable remains.
    """
    height, width = visible.shape
    contours, hierarchy = cv2.findContours(visible.astype(np.uint8), cv2.RETR_CCOMP,
                                           cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is not None and (hierarchy[0][:, 3] >= 0).any():
        rle = bitmap_to_rle(visible)
        return {"size": [height, width], "counts": rle_to_string(rle)}, visible
    parts = _polygons(list(contours), height, width)
    if not parts:
        return None, None
    decoded = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(parts, height, width)))
    return parts, decoded.astype(bool)


def _annotation(layer: Layer, visible: np.ndarray) -> tuple[dict | None, np.ndarray | None]:
    """COCO annotation fields (no ids but category) and the final bool [H, W] mask."""
    if layer.iscrowd:
        segmentation, final = _uncompressed_rle(visible), visible
    else:
        segmentation, final = encode_instance(visible)
    if final is None or final.sum() < MIN_VISIBLE_PIXELS:
        return None, None
    rle = bitmap_to_rle(final)
    return {"category_id": layer.category_id, "segmentation": segmentation,
            "area": rle_area(rle), "bbox": rle_bbox(rle), "iscrowd": int(layer.iscrowd)}, final


# ---------------------------------------------------------------------------- stuff

def _noise(rng: np.random.Generator, height: int, width: int, cell: int, strength: float,
           channels: int) -> np.ndarray:
    """float32 [H, W, channels]: Gaussian noise on a `cell`-pixel grid, cubic upsampled."""
    grid = rng.normal(0, strength, (height // cell + 2, width // cell + 2, channels))
    noise = cv2.resize(grid.astype(np.float32), (width, height),
                       interpolation=cv2.INTER_CUBIC)
    return noise.reshape(height, width, channels)


def _horizon(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """float [W]: the row where sky turns to ground in each column; tilted and wavy, and
    kept in the middle 70 % of the height so both regions show."""
    xs = np.arange(width) / width
    level = rng.uniform(0.3, 0.7) * height
    tilt = rng.uniform(-0.15, 0.15) * height * (xs - 0.5)
    cycles, phase = rng.uniform(0.5, 2.5), rng.uniform(0, 2 * np.pi)
    wave = rng.uniform(0.0, 0.05) * height * np.sin(2 * np.pi * cycles * xs + phase)
    return np.clip(level + tilt + wave, 0.15 * height, 0.85 * height)


def _tint(rng: np.random.Generator, hue: tuple, saturation: tuple,
          value: tuple) -> np.ndarray:
    """float32 [3] RGB in 0..255 drawn from the given HSV ranges."""
    rgb = colorsys.hsv_to_rgb(rng.uniform(*hue), rng.uniform(*saturation), rng.uniform(*value))
    return np.array(rgb, np.float32) * 255


def _sky(rng: np.random.Generator, height: int, width: int,
         horizon: np.ndarray) -> np.ndarray:
    """float32 [H, W, 3]: a light, low-saturation blue-grey, brightening toward the
    horizon, with soft cloud-like blotches and no fine grain."""
    tint = _tint(rng, (0.5, 0.66), (0.1, 0.45), (0.7, 0.95))
    rows = np.arange(height, dtype=np.float32)[:, None]
    closeness = np.clip(rows / np.maximum(horizon[None, :], 1.0), 0, 1)  # 0 top, 1 horizon
    image = tint + (rng.uniform(10, 30) * closeness)[..., None]
    image = image + np.abs(_noise(rng, height, width, 32, 14.0, 1))  # clouds: only lighter
    return cv2.GaussianBlur(image.astype(np.float32), (0, 0), 2.0)


def _ground(rng: np.random.Generator, height: int, width: int,
            horizon: np.ndarray) -> np.ndarray:
    """float32 [H, W, 3]: a darker brown-to-green, grainy at two scales with some colour
    in the grain, darkening toward the bottom."""
    tint = _tint(rng, (0.06, 0.35), (0.2, 0.5), (0.3, 0.55))
    rows = np.arange(height, dtype=np.float32)[:, None]
    depth = np.clip((rows - horizon[None, :]) / np.maximum(height - horizon[None, :], 1), 0, 1)
    image = tint - (rng.uniform(5, 25) * depth)[..., None]
    image = image + _noise(rng, height, width, 10, 12.0, 1) + _noise(rng, height, width, 3,
                                                                      9.0, 3)
    return cv2.GaussianBlur(image.astype(np.float32), (0, 0), 0.7)


def _stuff_background(rng: np.random.Generator, height: int,
                      width: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 [H, W, 3] sky over ground and uint8 [H, W] their category ids."""
    horizon = _horizon(rng, height, width)
    is_sky = np.arange(height)[:, None] < horizon[None, :]
    labels = np.where(is_sky, stuff_category_id("sky"),
                      stuff_category_id("ground")).astype(np.uint8)
    sky, ground = _sky(rng, height, width, horizon), _ground(rng, height, width, horizon)
    return np.where(is_sky[..., None], sky, ground), labels


# ---------------------------------------------------------------------------- painting

def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """float32 [H, W, 3]: a dull base colour, blotchy brightness, a faint colour cast."""
    base = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0, 0.35),
                                        rng.uniform(0.3, 0.75)), np.float32) * 255
    image = np.broadcast_to(base, (height, width, 3)).astype(np.float32)
    # Brightness noise is shared by the channels, so the texture stays low in saturation.
    for cell, strength, channels in ((24, 30.0, 1), (6, 14.0, 1), (16, 8.0, 3)):
        grid = rng.normal(0, strength, (height // cell + 2, width // cell + 2, channels))
        noise = cv2.resize(grid.astype(np.float32), (width, height),
                           interpolation=cv2.INTER_CUBIC)
        image += noise.reshape(height, width, channels)
    # Softens the grid pattern that cubic upsampling leaves behind.
    return cv2.GaussianBlur(image, (0, 0), 1.5)


def _paint(image: np.ndarray, layer: Layer, final: np.ndarray) -> None:
    """Colour `final` (bool [H, W]) in place; a crowd keeps each tiny shape's colour."""
    if layer.piece_ids is None:
        image[final] = layer.colours[0]
    else:
        image[final] = layer.colours[layer.piece_ids[final]]


def _finish(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Add a lighting ramp and sensor noise; return uint8 [H, W, 3]."""
    height, width = image.shape[:2]
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = (np.cos(angle) * xs / width + np.sin(angle) * ys / height)
    image = image * (0.9 + 0.2 * (ramp - ramp.min()) / max(np.ptp(ramp), 1e-6))[..., None]
    image += rng.normal(0, 5, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).round().astype(np.uint8)


def render_image(rng: np.random.Generator, plan: ImagePlan, max_objects: int,
                 stuff_rng: np.random.Generator | None = None) -> RenderedImage:
    """One image, its annotations (without ids, bottom to top) and pixel owners.

    ``rng`` draws the shapes, the plain background and the finish; ``stuff_rng`` (None: no
    stuff) the sky and ground that replace the plain background. The plain background is
    drawn either way, so ``rng`` gives the same shapes and the same shape pixels.
    """
    shape = (plan.height, plan.width)
    image = _background(rng, *shape)
    stuff = None
    if stuff_rng is not None:
        image, stuff = _stuff_background(stuff_rng, *shape)
    layers = _drop_hidden(_scene(rng, plan, max_objects), shape)
    annotations = []
    owner = np.zeros(shape, np.int16)
    for layer, visible in zip(layers, _visible(layers, shape)):
        annotation, final = _annotation(layer, visible)
        if annotation is not None:
            _paint(image, layer, final)
            annotations.append(annotation)
            owner[final] = len(annotations)
    return RenderedImage(_finish(rng, image), annotations, owner, stuff)


# ---------------------------------------------------------------------------- reading

def read(params: SourceConfig, report: QualityReport) -> SourceTables:
    """The generated dataset under ``params.root`` as the tables.

    ``instances`` and the thing categories come from ``annotations.json`` through the COCO
    reader, exactly as for any COCO source; ``stuff_segments`` (``annotation_id`` = the
    PNG segment id, ``instance_id`` = `coco_panoptic.instance_id`) and the stuff categories
    (``isthing`` false) from the panoptic export through the COCO panoptic reader, with its
    checks. An image whose panoptic PNG cannot be used is dropped with its instances.
    """
    from instseg_pipeline.data.sources import SourceTables, coco, coco_panoptic
    from instseg_pipeline.data.tables import make_categories, make_instances

    tables = coco.read(replace(params, annotations=ANNOTATIONS_JSON, images=IMAGE_DIR), report)
    root = Path(params.root)
    path = root / PANOPTIC_JSON
    _, panoptic_categories, by_image = coco_panoptic.load_panoptic(path, report)
    stuff_categories = panoptic_categories[~panoptic_categories["isthing"].astype(bool)]
    clash = sorted(set(stuff_categories["category_id"]) & set(tables.categories["category_id"]))
    if clash:
        from instseg_pipeline.data.quality import IngestionError

        raise IngestionError(f"{path}: stuff category ids {clash} are thing categories of "
                             f"{root / ANNOTATIONS_JSON}")
    records = [{"id": int(r.image_id), "file_name": str(r.file_name), "width": int(r.width),
                "height": int(r.height)} for r in tables.images.itertuples(index=False)]
    kept, _, stuff = coco_panoptic.read_segments(records, by_image, root / PANOPTIC_DIR,
                                                 panoptic_categories, report)
    images, instances = tables.images, tables.instances
    if len(kept) < len(records):
        keep = {record["id"] for record in kept}
        lost = ~instances["image_id"].isin(keep)
        for row in instances[lost].itertuples(index=False):
            report.drop("annotations", "image_dropped",
                        f"annotation {row.annotation_id}: the panoptic PNG of its image "
                        f"{row.image_id} was dropped")
        images = images[images["image_id"].isin(keep)].reset_index(drop=True)
        instances = instances[~lost].reset_index(drop=True)
    categories = make_categories([*tables.categories.to_dict("records"),
                                  *stuff_categories.to_dict("records")])
    logger.info("%s: %d stuff segments of %d categories", path, len(stuff),
                len(stuff_categories))
    return SourceTables(images, instances, categories, stuff_segments=make_instances(stuff))
