"""Image checks and decoding shared by ingestion, the torch Dataset and serving.

Policy (also in the README):
- EXIF orientation is applied when the transposed size matches the annotated size. When
  only the raw, untransposed size matches, the annotations were drawn on the raw pixels, so
  the raw pixels are used (counted as ``exif_ignored``). When neither matches the image is
  rejected with ``size_mismatch``.
- Every image becomes 8-bit RGB. Grayscale, palette, RGBA, CMYK are converted by Pillow;
  16-bit and 32-bit integer images are rescaled linearly from their full range (never clipped
  at 255), float images from [0, 1].
- An image larger than ``max_pixels`` is rejected from its header, before decoding.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

ImageFile.LOAD_TRUNCATED_IMAGES = False
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default limit

_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}


class ImageProblem(Exception):
    """An image that cannot be used; ``reason`` is a short code used for counting."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ImageInfo:
    """What the header says: size after EXIF orientation, raw size, mode, orientation."""

    width: int
    height: int
    raw_width: int
    raw_height: int
    mode: str
    orientation: int


def _open(path: Path, max_pixels: int) -> Image.Image:
    if not path.is_file():
        raise ImageProblem("missing_file", f"{path}: image file not found")
    if path.stat().st_size == 0:
        raise ImageProblem("empty_file", f"{path}: image file is empty (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            image = Image.open(path)
        except UnidentifiedImageError:
            raise ImageProblem("not_an_image", f"{path}: not a readable image file") from None
        except OSError as exc:
            raise ImageProblem("corrupt", f"{path}: cannot read image header ({exc})") from None
        finally:
            Image.MAX_IMAGE_PIXELS = previous
    if image.width * image.height > max_pixels:
        image.close()
        raise ImageProblem("too_many_pixels",
                           f"{path}: {image.width}x{image.height} = "
                           f"{image.width * image.height} pixels exceeds the limit {max_pixels}")
    return image


def _orientation(image: Image.Image, header_only: bool = False) -> int:
    try:
        if header_only and image.format == "PNG" and "exif" not in image.info:
            # Pillow would decode the whole PNG to look for an eXIf chunk after the pixels;
            # a header check must stay cheap, so only a chunk before the pixels counts here.
            return 1
        return int(image.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is no reason to drop the pixels
        return 1


def probe_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Read only the header of ``path``; raise `ImageProblem` when it is unusable."""
    path = Path(path)
    with _open(path, max_pixels) as image:
        orientation = _orientation(image, header_only=True)
        width, height = image.size
        if orientation in _TRANSPOSING_ORIENTATIONS:
            width, height = height, width
        return ImageInfo(width, height, image.width, image.height, image.mode, orientation)


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or values.max(initial=0) <= 65535 else 2**32 - 1
        gray = np.clip(np.round(values * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "F":
        gray = np.clip(np.round(np.asarray(image, dtype=np.float64) * 255.0), 0, 255)
        return np.repeat(gray.astype(np.uint8)[..., None], 3, axis=2)
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


def load_image(path: str | Path, expected_size: tuple[int, int] | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, str]:
    """Decode ``path`` to uint8 RGB ``[H, W, 3]`` following the module's EXIF policy.

    ``expected_size`` is the annotated ``(width, height)``; returns the array and the
    original mode. Raises `ImageProblem` for unreadable, truncated or mismatched images.
    """
    path = Path(path)
    with _open(path, max_pixels) as image:
        try:
            image.load()
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageProblem("corrupt", f"{path}: image data is truncated or corrupt ({exc})"
                               ) from None
        orientation = _orientation(image)
        mode = image.mode
        oriented = image
        if orientation in _TRANSPOSING_ORIENTATIONS or orientation in (2, 3, 4):
            oriented = ImageOps.exif_transpose(image)
        if expected_size is not None and oriented.size != tuple(expected_size):
            if image.size != tuple(expected_size):
                raise ImageProblem(
                    "size_mismatch",
                    f"{path}: file is {oriented.size[0]}x{oriented.size[1]} (after EXIF "
                    f"orientation) but annotated as {expected_size[0]}x{expected_size[1]}")
            oriented = image
        return _to_rgb_array(oriented), mode


def needs_exif_override(info: ImageInfo, expected_size: tuple[int, int]) -> bool:
    """True when annotations fit the raw pixels but not the EXIF-oriented ones."""
    oriented = (info.width, info.height)
    return oriented != tuple(expected_size) and (info.raw_width, info.raw_height) == tuple(
        expected_size)


# Modes whose pixels are the stored integers; "P" gives palette indices, never colours.
ID_MODES = ("1", "L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N")


def read_id_map(path: Path) -> np.ndarray:
    """int64 [H, W] ids of a one-channel mask (PNG; TIFF for 32 bit) at full bit depth.

    Fortran-ordered, because pycocotools encodes column-major masks without a copy.

    Raises `ImageProblem` (``unreadable_mask`` / ``unsupported_mask_mode``).
    """
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode not in ID_MODES:
                raise ImageProblem("unsupported_mask_mode",
                                   f"{path}: mask mode {image.mode} is not one id per pixel "
                                   f"(expected one of {', '.join(ID_MODES)})")
            return np.asfortranarray(np.asarray(image), dtype=np.int64)
    except ImageProblem:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, DecompressionBombError...
        raise ImageProblem("unreadable_mask", f"{path}: cannot read mask ({exc})") from None
