"""Image decoding policy: modes to RGB without saturation, EXIF, header-only limits."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from instseg_pipeline.data.images import ImageProblem, load_image, probe_image


def test_16bit_gray_is_rescaled_not_saturated(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    rgb, mode = load_image(tmp_path / "deep.png")
    assert mode.startswith("I")
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 4, 3)
    assert rgb[0, :, 0].tolist() == [0, 1, 128, 255]


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGBA", "CMYK", "I", "F"])
def test_every_mode_becomes_uint8_rgb(tmp_path, mode):
    path = tmp_path / ("x.tiff" if mode in ("CMYK", "F", "I") else "x.png")
    Image.new(mode, (7, 5)).save(path)
    rgb, original = load_image(path, expected_size=(7, 5))
    assert rgb.shape == (5, 7, 3) and rgb.dtype == np.uint8 and original == mode


def test_palette_with_transparency_keeps_colours(tmp_path):
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    image.save(tmp_path / "p.png", transparency=0)
    rgb, _ = load_image(tmp_path / "p.png")
    assert rgb[0, 0].tolist() == [200, 100, 50]


def test_exif_rotation_applied_when_size_matches(tmp_path):
    pixels = np.zeros((30, 40, 3), dtype=np.uint8)
    pixels[0, :, 0] = 255  # top row red in the raw file
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "r.png", exif=exif)
    assert (probe_image(tmp_path / "r.png").width, probe_image(tmp_path / "r.png").height) == (
        30, 40)
    rotated, _ = load_image(tmp_path / "r.png", expected_size=(30, 40))
    assert rotated.shape == (40, 30, 3) and rotated[:, -1, 0].all()  # now the right column
    raw, _ = load_image(tmp_path / "r.png", expected_size=(40, 30))
    assert raw.shape == (30, 40, 3) and raw[0, :, 0].all()
    with pytest.raises(ImageProblem) as info:
        load_image(tmp_path / "r.png", expected_size=(10, 10))
    assert info.value.reason == "size_mismatch"


def test_pillow_bomb_size_is_refused_before_decoding(tmp_path):
    # A real PNG whose header claims more pixels than the limit: refused from the header.
    Image.new("1", (12000, 8000)).save(tmp_path / "big.png")
    with pytest.raises(ImageProblem) as info:
        probe_image(tmp_path / "big.png")
    assert info.value.reason == "too_many_pixels" and "96000000" in str(info.value)
