"""The image check every reader applies, so all sources follow one policy.

Parameters read from the source block: ``verify_images`` (``decode``: every image must
decode fully, which catches truncated files; ``header``: size and format only, faster) and
``max_image_pixels``.
"""
from __future__ import annotations

from pathlib import Path

from instseg_pipeline.images import (DEFAULT_MAX_PIXELS, ImageProblem, load_image,
                                     needs_exif_override, probe_image)
from instseg_pipeline.quality import QualityReport

VERIFY_MODES = ("decode", "header")


def verify_mode(params: dict) -> str:
    """The ``verify_images`` parameter, checked."""
    mode = params.get("verify_images", "decode")
    if mode not in VERIFY_MODES:
        raise ValueError(f"verify_images must be one of {VERIFY_MODES}, not {mode!r}")
    return mode


def check_image(path: Path, expected: tuple[int, int], params: dict, report: QualityReport,
                label: str, expected_from: str = "annotated as") -> bool:
    """True when the image at ``path`` is usable at ``expected`` = (width, height).

    Otherwise it is dropped through ``report`` (or the run fails, per its policy) with a
    message that starts with ``label`` (e.g. ``image 12``). Mode conversions and ignored
    EXIF orientations are noted in the report.
    """
    max_pixels = int(params.get("max_image_pixels", DEFAULT_MAX_PIXELS))
    try:
        info = probe_image(path, max_pixels)
        exif_ignored = needs_exif_override(info, expected)
        if (info.width, info.height) != tuple(expected) and not exif_ignored:
            raise ImageProblem("size_mismatch", f"{path}: file is {info.width}x{info.height} "
                               f"(after EXIF orientation) but {expected_from} "
                               f"{expected[0]}x{expected[1]}")
        if verify_mode(params) == "decode":
            load_image(path, expected, max_pixels)
    except ImageProblem as exc:
        report.drop("images", exc.reason, f"{label} ({exc})")
        return False
    if info.mode != "RGB":
        report.note(f"converted_mode_{info.mode}")
    if exif_ignored:
        report.note("exif_ignored")  # annotations were drawn on the raw, unrotated pixels
    return True
