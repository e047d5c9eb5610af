"""Polygon / RLE / bitmap conversion (pycocotools), with the checks pycocotools skips.

pycocotools trusts its input: NaN polygon coordinates can crash it, an uncompressed RLE
whose counts do not add up to H*W decodes to whatever memory follows, and a polygon is
rasterised from its whole boundary sampled every 1/5 pixel, so one coordinate of 1e12 once
grew an ingestion to 24 GB. Every geometry that reaches it from a file goes through
`segmentation_problem` first, which refuses (reason codes in brackets), for an H x W image:

- polygons, all parts of one segmentation together:
  * more than (H+1)*(W+1) vertices, the image's pixel corners [polygon_too_many_vertices];
    decided from the list lengths alone, before any coordinate is read;
  * a vertex beyond the margin box x in [-W, 2W], y in [-H, 2H], i.e. more than one image
    size outside the picture [polygon_out_of_bounds]. Skipped, not clipped: a vertex that
    far out is a corrupt value (a typo, an overflow), not a shape leaving the picture, and
    clipping it would fill a wedge toward the border that nobody drew. Inside the box a
    polygon reaches pycocotools unchanged, so every kept mask is bit-exact to it;
  * more than 12*(H+2)*(W+2) boundary samples [polygon_too_long]: pycocotools' own count,
    the sum over the edges of max(|dx|, |dy|) + 1 at 5 samples per pixel; the limit leaves
    room for a boundary of 2*(H+1)*(W+1) pixels, every pixel edge of the image put
    together (which no raster needs), plus one sample per vertex;
- RLEs: more runs than the H*W+1 an H x W mask can have [rle_too_many_runs], from the
  list length (uncompressed) or, for a compressed string, from its length (at most
  6*(H*W+1) characters) before decoding and its run count while decoding; a compressed run
  longer than 6 characters (30 bits: pycocotools decodes into a C int) [rle_malformed].

Memory: a checked segmentation costs pycocotools at most 20 bytes per boundary sample
(240*(H+2)*(W+2) bytes) plus 4*(H*W+1) bytes to merge parts. The checks themselves
allocate nothing for list lengths and coordinate ranges, a few float64 copies of a part
(about 80 bytes per vertex, so at most 80*(H+1)*(W+1) bytes after the vertex limit) to
count boundary samples, and one fixed-size block (`_BLOCK_CHARS`) of a compressed string
at a time. The bound of a whole ingestion is in `sources.coco`.
"""
from __future__ import annotations

import math
from itertools import islice

import numpy as np
from pycocotools import mask as mask_utils

SAMPLES_PER_PIXEL = 5   # pycocotools' rleFrPoly samples polygon boundaries every 1/5 pixel
MAX_RUN_CHARS = 6       # 6 x 5 bits: the longest compressed run pycocotools decodes exactly
MAX_RUN = 2**32 - 1     # pycocotools stores runs as uint32


class GeometryError(ValueError):
    """A segmentation that cannot be turned into a mask; ``reason`` is a short code."""

    def __init__(self, message: str, reason: str = "geometry"):
        super().__init__(message)
        self.reason = reason


# --- limits derived from the image size ----------------------------------------------------

def max_polygon_vertices(height: int, width: int) -> int:
    """Vertices one segmentation may have: the (H+1)*(W+1) pixel corners of the image."""
    return (height + 1) * (width + 1)


def max_boundary_points(height: int, width: int) -> int:
    """Boundary samples pycocotools may allocate for one segmentation: 12*(H+2)*(W+2)."""
    return 12 * (height + 2) * (width + 2)


def max_rle_runs(height: int, width: int) -> int:
    """Runs an RLE of an H x W mask can have: H*W+1 (a leading empty run, then alternating)."""
    return height * width + 1


def within_margin(x_low: float, x_high: float, y_low: float, y_high: float,
                  height: int, width: int) -> bool:
    """True when [x_low, x_high] x [y_low, y_high] lies in the margin box
    x in [-W, 2W], y in [-H, 2H] (the image and one image size on every side)."""
    return -width <= x_low and x_high <= 2 * width and -height <= y_low and \
        y_high <= 2 * height


def _edges_bounded(vertices: int, height: int, width: int) -> bool:
    """True when ``vertices`` vertices inside the margin box cannot exceed the boundary
    limit: an edge there spans at most 15*max(H, W) - 1 samples, plus one for the edge."""
    return vertices * SAMPLES_PER_PIXEL * 3 * max(height, width) <= \
        max_boundary_points(height, width)


# --- polygons ---------------------------------------------------------------------------

def boundary_points(parts) -> int:
    """Boundary samples pycocotools' rleFrPoly allocates for these polygon parts.

    Per part of k vertices: sum over the k closing edges of max(|dx|, |dy|) + 1, with every
    coordinate rounded as it rounds it ((int)(5*v + .5), truncating toward zero). Allocates
    about 80 bytes per vertex; call it only on parts within the vertex limit and the
    margin box.
    """
    total = 0
    for part in parts:
        xy = np.asarray(part, dtype=np.float64).reshape(-1, 2)
        scaled = np.trunc(SAMPLES_PER_PIXEL * xy + 0.5)
        steps = np.abs(scaled - np.roll(scaled, -1, axis=0)).max(axis=1)
        total += int(steps.sum()) + len(steps)
    return total


def plain_polygon(segmentation, height: int, width: int) -> bool:
    """True for the common case that needs no further check (a fast path): one part of
    >= 3 finite points, few enough to stay within every limit, inside the margin box.

    False means "run `segmentation_problem`", not "bad". Three C-level passes, no copy.
    """
    if type(segmentation) is not list or len(segmentation) != 1:
        return False
    part = segmentation[0]
    if type(part) is not list or len(part) < 6 or len(part) % 2:
        return False
    vertices = len(part) // 2
    if vertices > max_polygon_vertices(height, width) or \
            not _edges_bounded(vertices, height, width):
        return False
    try:
        # a float start: a NaN / inf anywhere makes the sum non-finite, an int beyond float
        # range raises OverflowError, a non-number TypeError
        total = sum(part, 0.0)
        low, high = min(part), max(part)
    except (TypeError, OverflowError):
        return False
    side = min(height, width)  # both axes at once: inside [-side, 2*side] is inside the box
    return math.isfinite(total) and low >= -side and high <= 2 * side


def _part_values_problem(index: int, part, height: int, width: int) -> tuple[str, str] | None:
    """Non-numeric, non-finite or far-out coordinates of one part (no copy of the part)."""
    try:
        total = sum(part, 0.0)
    except TypeError:
        return "polygon_malformed", f"polygon part {index} has a non-numeric coordinate"
    except OverflowError:
        return ("polygon_out_of_bounds",
                f"polygon part {index} has a coordinate beyond the float range")
    if not math.isfinite(total):
        bad = next((v for v in part if not math.isfinite(v)), None)
        if bad is not None:
            return ("polygon_nonfinite",
                    f"polygon part {index} has a non-finite coordinate {bad!r}")
    x_low, x_high = min(islice(part, 0, None, 2)), max(islice(part, 0, None, 2))
    y_low, y_high = min(islice(part, 1, None, 2)), max(islice(part, 1, None, 2))
    if not math.isfinite(total) or not within_margin(x_low, x_high, y_low, y_high,
                                                     height, width):
        return ("polygon_out_of_bounds",
                (f"polygon part {index} spans x {x_low:g}..{x_high:g}, y {y_low:g}..{y_high:g}: "
                f"more than one image size outside the {width}x{height} image "
                f"(accepted: x in [{-width}, {2 * width}], y in [{-height}, {2 * height}])"))
    return None


def _polygon_problem(parts, height: int, width: int) -> tuple[str, str] | None:
    if not isinstance(parts, list) or len(parts) == 0:
        return "polygon_empty", "polygon segmentation has no parts"
    vertices = 0
    for index, part in enumerate(parts):
        if not isinstance(part, (list, tuple)):
            return "polygon_malformed", f"polygon part {index} is not a list of coordinates"
        if len(part) % 2:
            return ("polygon_odd_coordinates",
                    f"polygon part {index} has an odd number of coordinates ({len(part)})")
        if len(part) < 6:
            return ("polygon_too_few_points",
                    f"polygon part {index} has fewer than 3 points ({len(part) // 2})")
        vertices += len(part) // 2
    limit = max_polygon_vertices(height, width)
    if vertices > limit:
        return ("polygon_too_many_vertices",
                (f"polygon has {vertices} vertices, more than the {limit} pixel corners of "
                f"the {width}x{height} image"))
    for index, part in enumerate(parts):
        problem = _part_values_problem(index, part, height, width)
        if problem:
            return problem
    if not _edges_bounded(vertices, height, width):
        points, limit = boundary_points(parts), max_boundary_points(height, width)
        if points > limit:
            return ("polygon_too_long",
                    (f"polygon boundary needs {points} samples at 1/{SAMPLES_PER_PIXEL} pixel, "
                    f"more than the {limit} allowed for the {width}x{height} image"))
    return None


# --- compressed RLE strings -----------------------------------------------------------------

_VECTORISE_FROM = 2048  # shorter strings: a plain loop beats numpy's per-call overhead
_BLOCK_CHARS = 1 << 18  # longer strings are decoded in blocks of about this many characters


def _too_long_run() -> GeometryError:
    return GeometryError(f"compressed RLE run is longer than {MAX_RUN_CHARS} characters",
                         reason="rle_malformed")


def _check_run(value: int) -> None:
    if value < 0:
        raise GeometryError("compressed RLE string decodes to a negative run length",
                            reason="rle_malformed")
    if value > MAX_RUN:
        raise GeometryError(f"compressed RLE run length {value} exceeds {MAX_RUN}",
                            reason="rle_malformed")


def _summary_loop(data: bytes) -> tuple[int, int]:
    count, total, previous = 0, 0, (0, 0)  # previous: the runs two and one places back
    pos = 0
    while pos < len(data):
        value, shift, more = 0, 0, True
        while more:
            if pos >= len(data):
                raise GeometryError("compressed RLE string ends inside a run length",
                                    reason="rle_malformed")
            c = data[pos] - 48
            if c < 0 or c > 63:
                raise GeometryError("compressed RLE string has an invalid byte",
                                    reason="rle_malformed")
            if shift >= MAX_RUN_CHARS:
                raise _too_long_run()
            value |= (c & 0x1F) << (5 * shift)
            more = bool(c & 0x20)
            pos += 1
            shift += 1
            if not more and (c & 0x10):
                value |= -1 << (5 * shift)
        if count > 2:
            value += previous[0]
        _check_run(value)
        previous = (previous[1], value)
        count += 1
        total += value
    return count, total


def _block_summary(block: np.ndarray, first: int,
                   previous: tuple[int, int]) -> tuple[int, int, tuple[int, int]]:
    """(runs, their sum, the last two runs) of a block of whole runs (uint8 ``[n]``).

    ``first``: the global index of the block's first run; ``previous``: the runs at
    ``first - 2`` and ``first - 1``. Each run is a group of 5-bit chunks ending at a chunk
    without the 0x20 continuation bit; from the fourth run on, a run is stored as a delta
    to the run two places before it, so the even and odd runs are cumulative sums.
    """
    chunks = block.astype(np.int64) - 48
    if chunks.min() < 0 or chunks.max() > 63:
        raise GeometryError("compressed RLE string has an invalid byte", reason="rle_malformed")
    last = (chunks & 0x20) == 0
    if not last[-1]:
        raise GeometryError("compressed RLE string ends inside a run length",
                            reason="rle_malformed")
    run_of = np.concatenate(([0], np.cumsum(last)[:-1]))
    starts = np.flatnonzero(np.concatenate(([True], last[:-1])))
    position = np.arange(len(chunks)) - starts[run_of]
    if position.max() >= MAX_RUN_CHARS:
        raise _too_long_run()
    values = np.zeros(len(starts), np.int64)
    np.add.at(values, run_of, (chunks & 0x1F) << (5 * position))
    ends = np.flatnonzero(last)
    negative = (chunks[ends] & 0x10) != 0
    values[negative] -= np.int64(1) << (5 * (position[ends[negative]] + 1))
    runs = values.copy()
    index = first + np.arange(len(runs))
    for parity in (0, 1):
        chain = np.flatnonzero((index >= 3) & (index % 2 == parity))
        if len(chain) == 0:
            continue
        base_index = int(index[chain[0]]) - 2
        base = (runs[base_index - first] if base_index >= first
                else previous[base_index - first + 2])
        # runs < 2**32 and |deltas| < 2**29 over <= _BLOCK_CHARS runs: no int64 overflow
        runs[chain] = base + np.cumsum(values[chain])
    if len(runs):
        low, high = int(runs.min()), int(runs.max())
        _check_run(low)
        _check_run(high)
    tail = (previous[1], int(runs[-1])) if len(runs) == 1 else (int(runs[-2]), int(runs[-1]))
    return len(runs), int(runs.sum()), tail


def _summary_blocks(raw: bytes) -> tuple[int, int]:
    """`_block_summary` over blocks of about `_BLOCK_CHARS` characters, each cut after its
    last complete run, so that the working memory stays fixed whatever the length."""
    data = np.frombuffer(raw, np.uint8)
    count, total, previous, start = 0, 0, (0, 0), 0
    while start < len(data):
        stop = min(start + max(_BLOCK_CHARS, MAX_RUN_CHARS), len(data))
        if stop < len(data):
            # a run is at most MAX_RUN_CHARS long: its end lies in the block's last ones
            tail = data[max(start, stop - MAX_RUN_CHARS):stop]
            ends = np.flatnonzero(tail < 48 + 0x20)
            if len(ends) == 0:
                raise _too_long_run()
            stop = stop - len(tail) + int(ends[-1]) + 1
        runs, block_total, previous = _block_summary(data[start:stop], count, previous)
        count += runs
        total += block_total
        start = stop
    return count, total


def compressed_counts_summary(counts: str | bytes) -> tuple[int, int]:
    """(number of runs, sum of the run lengths) of a compressed COCO RLE string
    (pycocotools' LEB128 variant); `GeometryError` (reason ``rle_malformed``) when it is
    not one pycocotools decodes exactly. Working memory is fixed (one block)."""
    raw = counts.encode("ascii") if isinstance(counts, str) else counts
    if len(raw) < _VECTORISE_FROM:
        return _summary_loop(raw)
    return _summary_blocks(raw)


def compressed_counts_sum(counts: str | bytes) -> int:
    """Sum of the run lengths in a compressed COCO RLE string (see
    `compressed_counts_summary`)."""
    return compressed_counts_summary(counts)[1]


# --- RLE dicts ----------------------------------------------------------------------------

def _size_value(value) -> int | None:
    """An RLE size entry as an int: ints and integral floats, not bools."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _rle_problem(rle: dict, height: int, width: int) -> tuple[str, str] | None:
    size = rle.get("size")
    counts = rle.get("counts")
    if not (isinstance(size, (list, tuple)) and len(size) == 2):
        return "rle_malformed", f"RLE size {size!r} is not [height, width]"
    declared = [_size_value(size[0]), _size_value(size[1])]
    if None in declared:
        return "rle_malformed", f"RLE size {list(size)!r} is not two integers"
    if declared != [height, width]:
        return ("rle_size_mismatch",
                f"RLE size {list(size)} differs from the image size [{height}, {width}]")
    runs_limit = max_rle_runs(height, width)
    if isinstance(counts, list):
        if len(counts) > runs_limit:  # before reading any of them
            return ("rle_too_many_runs",
                    (f"uncompressed RLE has {len(counts)} runs, more than the "
                    f"{runs_limit} (H*W+1) a {height}x{width} mask can have"))
        if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
            return "rle_malformed", "uncompressed RLE counts must be non-negative integers"
        runs, total = len(counts), sum(counts)
    elif isinstance(counts, (str, bytes)):
        if len(counts) > MAX_RUN_CHARS * runs_limit:  # before decoding
            return ("rle_too_many_runs",
                    (f"compressed RLE string of {len(counts)} characters holds more than the "
                    f"{runs_limit} (H*W+1) runs a {height}x{width} mask can have"))
        if isinstance(counts, str) and not counts.isascii():
            return "rle_malformed", "compressed RLE string has a non-ASCII character"
        try:
            runs, total = compressed_counts_summary(counts)
        except GeometryError as exc:
            return exc.reason, str(exc)
    else:
        return ("rle_malformed",
                f"RLE counts of type {type(counts).__name__} are neither a list nor a string")
    if runs > runs_limit:
        return ("rle_too_many_runs",
                (f"compressed RLE has {runs} runs, more than the {runs_limit} (H*W+1) a "
                f"{height}x{width} mask can have"))
    if total != height * width:
        return ("rle_counts_sum",
                f"RLE counts sum to {total}, not height*width = {height * width}")
    return None


def segmentation_problem(segmentation, height: int, width: int) -> tuple[str, str] | None:
    """``(reason_code, message)`` saying why a COCO polygon list or RLE dict is unusable.

    None when it is fine. Reason codes: segmentation_malformed (neither a list nor a dict),
    polygon_empty, polygon_malformed, polygon_odd_coordinates, polygon_too_few_points,
    polygon_nonfinite, polygon_too_many_vertices, polygon_out_of_bounds, polygon_too_long,
    rle_malformed, rle_size_mismatch, rle_too_many_runs, rle_counts_sum (limits: module
    docstring).
    """
    if isinstance(segmentation, dict):
        return _rle_problem(segmentation, height, width)
    if not isinstance(segmentation, list):
        return ("segmentation_malformed",
                (f"segmentation of type {type(segmentation).__name__} is neither a polygon "
                f"list nor an RLE dict"))
    return _polygon_problem(segmentation, height, width)


def segmentation_to_rle(segmentation, height: int, width: int) -> dict:
    """Compressed RLE ``{"size": [h, w], "counts": bytes}`` of a checked COCO segmentation."""
    problem = segmentation_problem(segmentation, height, width)
    if problem:
        raise GeometryError(problem[1], reason=problem[0])
    return _checked_to_rle(segmentation, height, width)


def _checked_to_rle(segmentation, height: int, width: int) -> dict:
    if isinstance(segmentation, dict):
        if isinstance(segmentation["counts"], list):
            return mask_utils.frPyObjects(segmentation, height, width)
        counts = segmentation["counts"]
        return {"size": [height, width],
                "counts": counts.encode() if isinstance(counts, str) else counts}
    return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))


def segmentations_to_rles(segmentations: list, height: int, width: int) -> list[dict]:
    """Compressed RLEs of already-checked segmentations of one image, in one pass.

    Single-part polygons (the common case) go through pycocotools in one call; the rest
    one by one. Call `segmentation_problem` on each first.
    """
    rles: list = [None] * len(segmentations)
    single = [i for i, seg in enumerate(segmentations) if isinstance(seg, list) and len(seg) == 1]
    if single:
        batch = mask_utils.frPyObjects([segmentations[i][0] for i in single], height, width)
        for i, rle in zip(single, batch):
            rles[i] = rle
    for i, seg in enumerate(segmentations):
        if rles[i] is None:
            rles[i] = _checked_to_rle(seg, height, width)
    return rles


def bitmap_to_rle(mask: np.ndarray) -> dict:
    """Compressed RLE of one binary mask ``[H, W]`` (any dtype, nonzero = foreground)."""
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def rle_to_string(rle: dict) -> str:
    counts = rle["counts"]
    return counts.decode("ascii") if isinstance(counts, bytes) else counts


def string_to_rle(counts: str, height: int, width: int) -> dict:
    return {"size": [int(height), int(width)], "counts": counts.encode("ascii")}


def rle_area(rle: dict) -> int:
    return int(mask_utils.area(rle))


def rle_bbox(rle: dict) -> list[float]:
    """COCO box [x, y, w, h] of the mask's foreground."""
    return [float(v) for v in mask_utils.toBbox(rle)]


def decode_strings(counts: list[str], height: int, width: int) -> np.ndarray:
    """uint8 [N, H, W] bitmaps of compressed RLE strings that share one image size."""
    if not counts:
        return np.zeros((0, height, width), dtype=np.uint8)
    rles = [string_to_rle(c, height, width) for c in counts]
    return np.ascontiguousarray(np.transpose(mask_utils.decode(rles), (2, 0, 1)))


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """int32 [H, W] segment ids of a uint8 [H, W, 3] COCO panoptic PNG: R + 256 G + 256^2 B
    (0 = void)."""
    rgb = rgb.astype(np.int32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id_to_rgb(id_map: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] colour image of an integer [H, W] id map (ids below 256**3)."""
    ids = id_map.astype(np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1).astype(np.uint8)
