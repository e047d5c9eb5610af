"""Property-based tests of COCO ingestion over the annotation fields (hypothesis).

Polygons, RLE dicts (uncompressed and compressed), bboxes, ids, image sizes and the types
of every field are drawn from mixtures of valid values, near-valid ones and hostile ones
(1e12 coordinates, ints beyond float range, absurd vertex and run counts, wrong types).
Properties, for every draw:
- no exception escapes except `IngestionError` for a structurally inconsistent file, and
  that one names the json file;
- every annotation and image is either kept or dropped under a reason, and every drop
  names the item (``annotation <id>`` / ``annotations[<i>]``, ``image <id>``);
- every kept mask is bit-exact to pycocotools' own conversion of the same segmentation
  (the checks only let through what pycocotools handles sanely);
- skip and fail modes agree (fail raises exactly the first skip);
- memory stays bounded: the process's peak RSS grows by less than `RSS_GROWTH_LIMIT`
  over the whole run, under an address-space cap.

Profiles (``HYPOTHESIS_PROFILE``): ``instseg-short`` (default, 150 cases per test),
``long`` (5000 per test, for the record; ``--hypothesis-show-statistics`` prints how many
ran), ``quick`` (20, while editing).
"""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from memory_guard import address_space_limit, peak_rss_bytes
from PIL import Image
from pycocotools import mask as mask_utils

from instseg_pipeline.data import masks
from instseg_pipeline.data.config import SourceConfig
from instseg_pipeline.data.quality import IngestionError, QualityReport
from instseg_pipeline.data.sources import coco
from instseg_pipeline.data.tables import check_tables

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("instseg-short", max_examples=150, deadline=5000, database=None,
                          suppress_health_check=_SLOW_OK, print_blob=True)
settings.register_profile("long", max_examples=5000, deadline=None, database=None,
                          suppress_health_check=_SLOW_OK, print_blob=True)
settings.register_profile("quick", max_examples=20, deadline=None, database=None,
                          suppress_health_check=_SLOW_OK, print_blob=True)
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "instseg-short"))

RSS_GROWTH_LIMIT = 256 << 20  # every image here is <= 48x48: any real leak of a limit
ADDRESS_SPACE_EXTRA = 2 << 30  # shows as gigabytes, far above this
_BASELINE: dict[str, int] = {}

HUGE = [1e12, -1e12, 1e300, 10**400, -(10**30), float("nan"), float("inf"), float("-inf")]
ODD_TYPES = [None, "1", [], {}, True, [1, 2], {"a": 1}]


def _assert_rss_bounded() -> None:
    peak = peak_rss_bytes()
    baseline = _BASELINE.setdefault("rss", peak)
    assert peak - baseline < RSS_GROWTH_LIMIT, f"peak RSS grew by {(peak - baseline) >> 20} MB"


# --- strategies --------------------------------------------------------------------------

def coordinate(height: int, width: int):
    """Mostly within the margin box, sometimes beyond it, sometimes hostile."""
    span = 3 * max(height, width)
    return st.one_of(
        st.floats(-span, span, allow_nan=False).map(lambda v: round(v, 2)),
        st.integers(-span, span),
        st.sampled_from(HUGE),
        st.sampled_from([True, "3", None, [1.0]]),
    )


@st.composite
def polygons(draw, height: int, width: int):
    """Polygon lists: plain, multi-part, degenerate, hostile values, absurd sizes."""
    kind = draw(st.sampled_from(["inside", "inside", "margin", "far_out", "any",
                                 "many_vertices", "zigzag", "degenerate"]))
    if kind in ("inside", "margin", "far_out"):
        scale = 1.0 if kind == "inside" else 3.0
        offset = 0.0 if kind == "inside" else 1.0
        part = st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=3, max_size=12)
        parts = draw(st.lists(part, min_size=1, max_size=3))
        parts = [[round(v, 2) for x, y in p for v in ((x * scale - offset) * width,
                                                       (y * scale - offset) * height)]
                 for p in parts]
        if kind == "far_out":  # one value just beyond the margin box, or absurd
            target = parts[draw(st.integers(0, len(parts) - 1))]
            index = draw(st.integers(0, len(target) - 1))
            side = width if index % 2 == 0 else height
            target[index] = draw(st.sampled_from(HUGE + [2 * side + 0.5, -side - 0.5]))
        return parts
    if kind == "any":
        coords = st.lists(coordinate(height, width), min_size=0, max_size=16)
        return draw(st.lists(coords, min_size=0, max_size=3))
    if kind == "many_vertices":  # around the vertex limit
        limit = masks.max_polygon_vertices(height, width)
        vertices = draw(st.integers(max(3, limit - 2), limit + 3))
        return [[v for i in range(vertices) for v in (float(i % (width + 1)), float(i % 2))]]
    if kind == "zigzag":  # edges crossing the margin box: around the boundary limit
        reps = draw(st.integers(1, 40))
        return [[-width, -height, 2 * width, 2 * height, -width, 2 * height, 2 * width,
                 -height] * reps]
    return draw(st.sampled_from([[], [[]], [[1, 2]], [[1, 2, 3, 4, 5]], [[1, 1, 2, 2, 3]],
                                 [[0, 0, 1, 1, 2, 2]], [[0, 0, 0, 0, 0, 0]], "poly", 7]))


def _uncompressed(bitmap: np.ndarray) -> list[int]:
    flat = bitmap.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    edges = np.concatenate(([0], changes, [flat.size]))
    counts = np.diff(edges).tolist()
    return ([0] + counts) if flat.size and flat[0] else counts


@st.composite
def rles(draw, height: int, width: int):
    """RLE dicts: valid (both encodings) from random bitmaps, then possibly damaged."""
    seed, density = draw(st.integers(0, 2**32 - 1)), draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    rng = np.random.default_rng(seed)
    bitmap = (rng.random((height, width)) < density).astype(np.uint8)
    compressed = draw(st.booleans())
    if compressed:
        counts = mask_utils.encode(np.asfortranarray(bitmap))["counts"].decode()
    else:
        counts = _uncompressed(bitmap)
    size = [height, width]
    damage = draw(st.sampled_from(["none", "none", "none", "size", "counts", "runs",
                                   "type", "text"]))
    if damage == "size":
        size = draw(st.sampled_from([[height + 1, width], [float(height), float(width)],
                                     [str(height), width], [height], None,
                                     [True, width], [height, 10**400]]))
    elif damage == "counts" and not compressed:
        index = draw(st.integers(0, max(0, len(counts) - 1)))
        counts = list(counts)
        if counts:
            counts[index] = draw(st.sampled_from([-1, counts[index] + 1, 1.5, True, 2**64,
                                                  "3", None]))
    elif damage == "counts":
        counts = draw(st.text(alphabet=st.characters(min_codepoint=40, max_codepoint=120),
                              max_size=40))
    elif damage == "runs":  # more runs than the mask can have
        extra = draw(st.integers(1, 3))
        if compressed:
            counts = "0" * (masks.MAX_RUN_CHARS * (height * width + 1) + extra)
        else:
            counts = [0] * (height * width + extra) + [height * width]
    elif damage == "type":
        counts = draw(st.sampled_from([None, 5, {"a": 1}, 1.5]))
    elif damage == "text":
        counts = draw(st.sampled_from(["\u00e9\u00e9", "\ud800", "o" * 7 + "0", "0" * 3]))
    return {"size": size, "counts": counts}


def segmentations(height: int, width: int):
    return st.one_of(polygons(height, width), rles(height, width),
                     st.sampled_from([None, 3, "x", {"size": [height, width]}]))


def bboxes(height: int, width: int):
    """Mostly absent or plausible (so that the segmentation gets checked), else hostile."""
    number = st.one_of(st.floats(-2 * width, 2 * width, allow_nan=False),
                       st.sampled_from(HUGE), st.integers(-5, 50))
    plausible = st.tuples(st.floats(0, width), st.floats(0, height), st.floats(0.5, width),
                          st.floats(0.5, height)).map(list)
    return st.one_of(st.none(), st.none(), plausible, plausible, plausible,
                     st.lists(number, min_size=4, max_size=4), st.lists(number, max_size=6),
                     st.sampled_from(ODD_TYPES))


IMAGE_SIZES = [(1, 1), (6, 8), (17, 5), (32, 48)]  # (height, width)


# --- reference: pycocotools' own conversion (COCO.annToRLE) ---------------------------------

def reference_mask(segmentation, height: int, width: int) -> np.ndarray:
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        counts = segmentation["counts"]
        rle = {"size": [height, width],
               "counts": counts.encode() if isinstance(counts, str) else counts}
    return mask_utils.decode(rle)


def _decode(counts: str, height: int, width: int) -> np.ndarray:
    return masks.decode_strings([counts], height, width)[0]


_NAMED_ANNOTATION = re.compile(r"annotation -?\d+|annotations\[\d+\]")
_NAMED_IMAGE = re.compile(r"image -?\d+|images\[\d+\]")


# --- one image's annotations: convert_annotations ---------------------------------------

@st.composite
def image_annotations(draw):
    height, width = draw(st.sampled_from(IMAGE_SIZES))
    anns = []
    for index in range(draw(st.integers(1, 5))):
        ann = {"id": 1000 + index, "image_id": 7, "category_id": 1,
               "segmentation": draw(segmentations(height, width)),
               "iscrowd": draw(st.sampled_from([0, 1, True, None, "1"]))}
        if draw(st.integers(0, 3)):  # sometimes no bbox key at all
            ann["bbox"] = draw(bboxes(height, width))
        anns.append(ann)
    return {"id": 7, "file_name": "img.png", "height": height, "width": width}, anns


@settings(PROFILE)
@given(image_annotations())
def test_annotations_are_kept_bit_exact_or_dropped_and_named(case):
    record, anns = case
    height, width = record["height"], record["width"]
    with address_space_limit(ADDRESS_SPACE_EXTRA):
        columns, problems = coco.convert_annotations(anns, record)
    assert len(columns["instance_id"]) + len(problems) == len(anns)
    for reason, message in problems:
        assert re.fullmatch(r"[a-z_]+", reason), reason
        assert _NAMED_ANNOTATION.search(message) and "image 7" in message, message
        event(f"dropped: {reason}")  # --hypothesis-show-statistics lists the reasons hit
    by_id = {ann["id"]: ann for ann in anns}
    for instance_id, counts, area in zip(columns["instance_id"], columns["rle"],
                                         columns["area"]):
        segmentation = by_id[instance_id]["segmentation"]
        # a kept geometry is one pycocotools handles within the stated limits
        if isinstance(segmentation, list):
            event("kept: polygon")
            coords = [v for part in segmentation for v in part]
            assert len(coords) // 2 <= masks.max_polygon_vertices(height, width)
            assert masks.within_margin(min(coords[0::2]), max(coords[0::2]),
                                       min(coords[1::2]), max(coords[1::2]), height, width)
            assert masks.boundary_points(segmentation) <= masks.max_boundary_points(
                height, width)
        else:
            event(f"kept: {type(segmentation['counts']).__name__} RLE")
            assert len(segmentation["counts"]) <= masks.MAX_RUN_CHARS * masks.max_rle_runs(
                height, width)
        mask = _decode(counts, height, width)
        assert np.array_equal(mask, reference_mask(segmentation, height, width)), instance_id
        assert area == int(mask.sum()) > 0
    _assert_rss_bounded()


# --- whole files: coco.read ----------------------------------------------------------------

@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco_properties")
    (root / "images").mkdir()
    for height, width in IMAGE_SIZES:
        Image.new("RGB", (width, height), (90, 120, 30)).save(
            root / "images" / f"{width}x{height}.png")
    return root


def ids():
    return st.one_of(st.integers(1, 6), st.integers(1, 6), st.integers(1, 6),
                     st.sampled_from([2**63, -1, 0, "1", 1.0, None, True, [1]]))


@st.composite
def image_records(draw, index: int):
    if draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from(ODD_TYPES))
    height, width = draw(st.sampled_from(IMAGE_SIZES))
    record = {"id": index + 1, "file_name": f"{width}x{height}.png", "width": width,
              "height": height}
    damage = draw(st.sampled_from(["none"] * 6 + ["id", "size", "huge", "file"]))
    if damage == "id":
        record["id"] = draw(ids())
    elif damage == "size":
        record[draw(st.sampled_from(["width", "height"]))] = draw(
            st.sampled_from([0, -3, 2.5, "8", None, True, width + 1]))
    elif damage == "huge":  # declared over max_image_pixels
        record.update(width=100_000, height=100_000)
    elif damage == "file":
        record["file_name"] = draw(st.sampled_from(["", None, "missing.png", 5]))
    return record


@st.composite
def coco_files(draw):
    images = [draw(image_records(i)) for i in range(draw(st.integers(1, 3)))]
    sizes = {r["id"]: (r.get("height"), r.get("width")) for r in images
             if isinstance(r, dict) and type(r.get("id")) is int
             and type(r.get("height")) is int and type(r.get("width")) is int
             and 0 < r["height"] <= 48 and 0 < r["width"] <= 48}
    annotations = []
    for index in range(draw(st.integers(0, 6))):
        if draw(st.integers(0, 12)) == 0:
            annotations.append(draw(st.sampled_from(ODD_TYPES)))
            continue
        image_id = draw(st.sampled_from(sorted(sizes) or [1]))
        height, width = sizes.get(image_id, (8, 8))
        ann = {"id": 100 + index, "image_id": image_id, "category_id": 1,
               "segmentation": draw(st.one_of(polygons(height, width), rles(height, width))),
               "iscrowd": draw(st.sampled_from([0, 1]))}
        if draw(st.booleans()):
            ann["bbox"] = draw(bboxes(height, width))
        if draw(st.integers(0, 8)) == 0:
            ann[draw(st.sampled_from(["id", "image_id", "category_id"]))] = draw(ids())
        annotations.append(ann)
    categories = [{"id": 1, "name": "thing"}]
    if draw(st.integers(0, 40)) == 0:
        categories.append(draw(st.sampled_from(ODD_TYPES + [{"id": "2"}, {"id": 1}])))
    return {"images": images, "annotations": annotations, "categories": categories}


class RecordingReport(QualityReport):
    """Keeps every drop, not only the first few examples per reason."""

    def __init__(self, on_invalid: str):
        super().__init__("coco", on_invalid)
        self.every: list[tuple[str, str, str]] = []

    def drop(self, kind: str, reason: str, message: str) -> None:
        if self.on_invalid == "skip":
            self.every.append((kind, reason, message))
        super().drop(kind, reason, message)


def _read(root, on_invalid: str):
    report = RecordingReport(on_invalid)
    params = SourceConfig.from_params({"type": "coco", "root": str(root),
                                       "annotations": "annotations.json", "images": "images",
                                       "verify_images": "header", "workers": 0})
    with address_space_limit(ADDRESS_SPACE_EXTRA):
        return coco.read(params, report), report


@settings(PROFILE)
@given(data=coco_files())
def test_files_are_read_with_every_item_accounted_for(image_root, data):
    path = image_root / "annotations.json"
    path.write_text(json.dumps(data, allow_nan=True))
    try:
        tables, report = _read(image_root, "skip")
    except IngestionError as exc:
        assert str(path) in str(exc), str(exc)  # structural: the file is inconsistent
        event("fatal: " + re.sub(r"[\d\[\]'\"]+", "", str(exc).split(": ", 1)[1])[:40])
        with pytest.raises(IngestionError):
            _read(image_root, "fail")
        _assert_rss_bounded()
        return
    dropped = {kind: sum(report.dropped[kind].values()) for kind in report.dropped}
    assert len(tables.images) + dropped["images"] == len(data["images"])
    assert len(tables.instances) + dropped["annotations"] == len(data["annotations"])
    for kind, reason, message in report.every:
        named = _NAMED_ANNOTATION if kind == "annotations" else _NAMED_IMAGE
        assert named.search(message), message
        event(f"dropped {kind[:-1]}: {reason}")
    event(f"kept instances: {min(len(tables.instances), 3)}{'+' if len(tables.instances) > 2 else ''}")
    check_tables(tables.images, tables.instances, tables.categories)
    sizes = tables.images.set_index("image_id")[["height", "width"]]
    by_id = {a["id"]: a for a in data["annotations"] if isinstance(a, dict)
             and type(a.get("id")) is int}
    for row in tables.instances.itertuples(index=False):
        height, width = (int(v) for v in sizes.loc[row.image_id])
        expected = reference_mask(by_id[row.instance_id]["segmentation"], height, width)
        assert np.array_equal(_decode(row.rle, height, width), expected), row.instance_id
    # fail mode stops at the first item skip mode dropped, with the same message
    if report.every:
        with pytest.raises(IngestionError) as info:
            _read(image_root, "fail")
        assert str(info.value) == report.every[0][2]
    _assert_rss_bounded()
