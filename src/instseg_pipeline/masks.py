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
        for value in part:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return ("polygon_malformed",
                        f"polygon part {index} has a non-numeric coordinate {value!r}")
            if not math.isfinite(value):
                return ("polygon_nonfinite",
                        f"polygon part {index} has a non-finite coordinate {value!r}")
    return None


def compressed_counts_sum(counts: str | bytes) -> int:
    """Sum of the run lengths in a compressed COCO RLE string (pycocotools' LEB128 variant)."""
    data = counts.encode() if isinstance(counts, str) else counts
    runs: list[int] = []
    pos = 0
    while pos < len(data):
        value, shift, more = 0, 0, True
        while more:
            if pos >= len(data):
                raise GeometryError("compressed RLE string ends inside a run length")
            c = data[pos] - 48
            if c < 0 or c > 63:
                raise GeometryError(f"compressed RLE string has an invalid byte {data[pos]!r}")
            value |= (c & 0x1F) << (5 * shift)
            more = bool(c & 0x20)
            pos += 1
            shift += 1
            if not more and (c & 0x10):
                value |= -1 << (5 * shift)
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            raise GeometryError("compressed RLE string decodes to a negative run length")
        runs.append(value)
    return sum(runs)


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
            return "rle_malformed", str(exc)
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
    if isinstance(segmentation, dict):
        if isinstance(segmentation["counts"], list):
            return mask_utils.frPyObjects(segmentation, height, width)
        counts = segmentation["counts"]
        return {"size": [height, width],
                "counts": counts.encode() if isinstance(counts, str) else counts}
    parts = [[float(v) for v in part] for part in segmentation]
    return mask_utils.merge(mask_utils.frPyObjects(parts, height, width))


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
