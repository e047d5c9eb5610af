"""The image check every reader applies, so all sources follow one policy.

Parameters read from the source block (`data.config.SourceConfig`): ``verify_images``
(``decode``: every image must decode fully, which catches truncated files; ``header``: size
and format only, faster), ``max_image_pixels`` and ``workers`` (processes for checking many
images, 0 = none; null: `default_workers`).
"""
from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from instseg_pipeline.data.images import (
    ImageProblem,
    load_image,
    needs_exif_override,
    probe_image,
)
from instseg_pipeline.data.quality import QualityReport

if TYPE_CHECKING:
    from instseg_pipeline.data.config import SourceConfig

VERIFY_MODES = ("decode", "header")
PARALLEL_MIN_IMAGES = 256  # below this, starting worker processes costs more than it saves


def verify_mode(params: SourceConfig) -> str:
    """The ``verify_images`` parameter, checked (a config built by hand skips the schema)."""
    mode = params.verify_images
    if mode not in VERIFY_MODES:
        raise ValueError(f"verify_images must be one of {VERIFY_MODES}, not {mode!r}")
    return mode


@dataclass(frozen=True)
class ImageCheck:
    """What checking one image found; ``reason`` is empty when it is usable."""

    reason: str = ""
    message: str = ""
    mode: str = "RGB"
    exif_ignored: bool = False


def inspect_image(path: Path, expected: tuple[int, int], params: SourceConfig,
                  expected_from: str = "annotated as") -> ImageCheck:
    """Check the image at ``path`` against ``expected`` = (width, height); report nothing."""
    max_pixels = params.max_image_pixels
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
        return ImageCheck(exc.reason, str(exc))
    return ImageCheck(mode=info.mode, exif_ignored=exif_ignored)


def record_check(check: ImageCheck, report: QualityReport, label: str) -> bool:
    """Apply one `ImageCheck` to ``report``: drop (or raise) or note; True when usable."""
    if check.reason:
        report.drop("images", check.reason, f"{label} ({check.message})")
        return False
    if check.mode != "RGB":
        report.note(f"converted_mode_{check.mode}")
    if check.exif_ignored:
        report.note("exif_ignored")  # annotations were drawn on the raw, unrotated pixels
    return True


def check_image(path: Path, expected: tuple[int, int], params: SourceConfig,
                report: QualityReport,
                label: str, expected_from: str = "annotated as") -> bool:
    """True when the image at ``path`` is usable at ``expected`` = (width, height).

    Otherwise it is dropped through ``report`` (or the run fails, per its policy) with a
    message that starts with ``label`` (e.g. ``image 12``).
    """
    return record_check(inspect_image(path, expected, params, expected_from), report, label)


def _inspect_job(job: tuple[Path, tuple[int, int], SourceConfig]) -> ImageCheck:
    return inspect_image(*job)


def default_workers(params: SourceConfig) -> int:
    """Processes checking images beside the caller's own work.

    ``decode``: every CPU (decoding dominates). ``header``: one CPU fewer, left to the main
    process, which converts annotations meanwhile; more processes than CPUs only slows both.
    """
    cpus = os.cpu_count() or 1
    return cpus if verify_mode(params) == "decode" else cpus - 1


def inspect_images(jobs: list[tuple[Path, tuple[int, int]]],
                   params: SourceConfig) -> Iterator[ImageCheck]:
    """`ImageCheck` of each (path, (width, height)) job, in order, started at once.

    With many images the checks run in ``workers`` processes (0: in this process, lazily;
    default: `default_workers`), so the caller can convert annotations while images are
    being opened and decoded.
    """
    workers = default_workers(params) if params.workers is None else params.workers
    if workers < 1 or len(jobs) < PARALLEL_MIN_IMAGES:
        return (inspect_image(path, size, params) for path, size in jobs)
    # fork: workers share the already-imported modules and start in milliseconds.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
    chunk = max(1, len(jobs) // (workers * 8))
    results = pool.map(_inspect_job, [(path, size, params) for path, size in jobs],
                       chunksize=chunk)
    pool.shutdown(wait=False)
    return results
