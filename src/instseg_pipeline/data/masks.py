"""Polygon / RLE / bitmap conversion (pycocotools), with the checks pycocotools skips.

pycocotools trusts its input: NaN polygon coordinates can crash it and an uncompressed RLE
whose counts do not add up to H*W decodes to whatever memory follows. Every geometry that
reaches it from a file goes through `segmentation_problem` first.
"""
from __future__ import annotations

import math

import numpy as np
from pycocotools import mask as mask_utils


class GeometryError(ValueError):
    """A segmentation that cannot be turned into a mask; ``reason`` is a short code."""

    def __init__(self, message: str, reason: str = "geometry"):
        super().__init__(message)
        self.reason = reason


def _polygon_problem(parts) -> tuple[str, str] | None:
    if not isinstance(parts, list) or len(parts) == 0:
        return "polygon_empty", "polygon segmentation has no parts"
    for index, part in enumerate(parts):
        if not isinstance(part, (list, tuple)):
            return "polygon_malformed", f"polygon part {index} is not a list of coordinates"
        if len(part) % 2:
            return ("polygon_odd_coordinates",
                    f"polygon part {index} has an odd number of coordinates ({len(part)})")
        if len(part) < 6:
            return ("polygon_too_few_points",
                    f"polygon part {index} has fewer than 3 points ({len(part) // 2})")
        try:
            # One C-level sum instead of a Python loop: NaN or inf anywhere makes it non-finite.
            total = sum(part)
        except TypeError:
            return "polygon_malformed", f"polygon part {index} has a non-numeric coordinate"
        if not math.isfinite(total):
            return ("polygon_nonfinite",
                    (f"polygon part {index} has a non-finite coordinate "
                    f"{next(v for v in part if not math.isfinite(v))!r}"))
    return None


_VECTORISE_FROM = 2048  # shorter strings: a plain loop beats numpy's per-call overhead


def _counts_sum_loop(data: bytes) -> int:
    runs: list[int] = []
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
            value |= (c & 0x1F) << (5 * shift)
            more = bool(c & 0x20)
            pos += 1
            shift += 1
            if not more and (c & 0x10):
                value |= -1 << (5 * shift)
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            raise GeometryError("compressed RLE string decodes to a negative run length",
                                reason="rle_malformed")
        runs.append(value)
    return sum(runs)


def compressed_counts_sum(counts: str | bytes) -> int:
    """Sum of the run lengths in a compressed COCO RLE string (pycocotools' LEB128 variant).

    Vectorised: each run is a group of 5-bit chunks ending at a chunk without the 0x20
    continuation bit; from the fourth run on, a run is stored as a delta to the run two
    places before it, so the even and odd runs are cumulative sums.
    """
    raw = counts.encode() if isinstance(counts, str) else counts
    if len(raw) < _VECTORISE_FROM:
        return _counts_sum_loop(raw)
    data = np.frombuffer(raw, np.uint8)
    chunks = data.astype(np.int64) - 48
    if len(chunks) == 0:
        return 0
    if chunks.min() < 0 or chunks.max() > 63:
        raise GeometryError("compressed RLE string has an invalid byte", reason="rle_malformed")
    last = (chunks & 0x20) == 0
    if not last[-1]:
        raise GeometryError("compressed RLE string ends inside a run length",
                            reason="rle_malformed")
    run_of = np.concatenate(([0], np.cumsum(last)[:-1]))
    starts = np.flatnonzero(np.concatenate(([True], last[:-1])))
    position = np.arange(len(chunks)) - starts[run_of]
    if position.max() > 11:
        raise GeometryError("compressed RLE run length is too long", reason="rle_malformed")
    values = np.zeros(len(starts), np.int64)
    np.add.at(values, run_of, (chunks & 0x1F) << (5 * position))
    ends = np.flatnonzero(last)
    negative = (chunks[ends] & 0x10) != 0
    values[negative] -= np.int64(1) << (5 * (position[ends[negative]] + 1))
    runs = values.copy()
    for parity in (0, 1):
        index = np.arange(len(runs))
        tail = index[(index >= 3) & (index % 2 == (1 - parity))]
        if len(tail):
            base = runs[tail[0] - 2]
            runs[tail] = base + np.cumsum(values[tail])
    if (runs < 0).any():
        raise GeometryError("compressed RLE string decodes to a negative run length",
                            reason="rle_malformed")
    return int(runs.sum())


def _rle_problem(rle: dict, height: int, width: int) -> tuple[str, str] | None:
    size = rle.get("size")
    counts = rle.get("counts")
    if not (isinstance(size, (list, tuple)) and len(size) == 2):
        return "rle_malformed", f"RLE size {size!r} is not [height, width]"
    if [int(size[0]), int(size[1])] != [height, width]:
        return ("rle_size_mismatch",
                f"RLE size {list(size)} differs from the image size [{height}, {width}]")
    if isinstance(counts, list):
        if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
            return "rle_malformed", "uncompressed RLE counts must be non-negative integers"
        total = sum(counts)
    elif isinstance(counts, (str, bytes)):
        try:
            total = compressed_counts_sum(counts)
        except GeometryError as exc:
            return exc.reason, str(exc)
    else:
        return ("rle_malformed",
                f"RLE counts of type {type(counts).__name__} are neither a list nor a string")
    if total != height * width:
        return ("rle_counts_sum",
                f"RLE counts sum to {total}, not height*width = {height * width}")
    return None


def segmentation_problem(segmentation, height: int, width: int) -> tuple[str, str] | None:
    """``(reason_code, message)`` saying why a COCO polygon list or RLE dict is unusable.

    None when it is fine. Reason codes: polygon_empty, polygon_malformed,
    polygon_odd_coordinates, polygon_too_few_points, polygon_nonfinite, rle_malformed,
    rle_size_mismatch, rle_counts_sum.
    """
    if isinstance(segmentation, dict):
        return _rle_problem(segmentation, height, width)
    return _polygon_problem(segmentation)


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
