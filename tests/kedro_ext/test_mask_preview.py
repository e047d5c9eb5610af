"""`MaskParquetDataset.preview`: the Kedro-Viz picture of a mask table (instances,
predictions) is a small PNG where the masks show."""
from __future__ import annotations

import base64
import inspect
import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from instseg_pipeline.data.masks import bitmap_to_rle, rle_to_string
from instseg_pipeline.kedro_ext.datasets import MaskParquetDataset

TILE = 64


def _rle(height: int, width: int, rows: slice, cols: slice) -> str:
    mask = np.zeros((height, width), np.uint8)
    mask[rows, cols] = 1
    return rle_to_string(bitmap_to_rle(mask))


@pytest.fixture
def tables(tmp_path) -> dict:
    """Three 100 x 200 images (a white one on disk), one square mask each in its left half;
    image 3 holds one more instance the previews of two images leave out."""
    root = tmp_path / "raw"
    root.mkdir()
    Image.fromarray(np.full((100, 200, 3), 255, np.uint8)).save(root / "a.png")
    images = pd.DataFrame({"image_id": [7, 8, 9], "file_name": ["a.png", "gone.png", "c.png"],
                           "height": [100] * 3, "width": [200] * 3, "split": ["val"] * 3})
    images.to_parquet(tmp_path / "images.parquet")
    square = _rle(100, 200, slice(20, 80), slice(20, 80))
    instances = pd.DataFrame({"instance_id": [1, 2, 3, 4], "image_id": [7, 8, 9, 9],
                              "category_id": [1, 1, 1, 1], "rle": [square] * 4,
                              "bbox": [np.array([20.0, 20, 60, 60])] * 4})
    path = tmp_path / "instances.parquet"
    MaskParquetDataset(filepath=str(path)).save(instances)
    return {"root": root, "images": tmp_path / "images.parquet", "instances": path,
            "tmp": tmp_path}


def _decode(preview: str) -> np.ndarray:
    png = base64.b64decode(preview)
    assert png.startswith(b"\x89PNG")
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def test_preview_is_a_small_png_where_the_masks_show(tables):
    dataset = MaskParquetDataset(filepath=str(tables["instances"]))
    strip = _decode(dataset.preview(images=str(tables["images"]), root=str(tables["root"]),
                                    max_images=2, tile=TILE))
    assert strip.shape == (TILE, 2 * TILE, 3)  # two tiles: image 9 is left out
    # each 100 x 200 image shrinks to 64 x 32, centred: rows 16-47; the mask is at x 6-25
    for k, background in ((0, 255), (1, 64)):  # image 7 from its file, 8 on a grey canvas
        tile = strip[:, k * TILE:(k + 1) * TILE]
        inside, outside = tile[24:40, 10:22], tile[24:40, 40:60]
        assert np.abs(outside - background).max() <= 2, k
        assert np.abs(inside - background).mean() > 30, k  # tinted
    assert strip[:14].max() == 0  # the letterbox above the image stays black


def test_masks_differ_from_an_empty_table(tables):
    dataset = MaskParquetDataset(filepath=str(tables["instances"]))
    with_masks = _decode(dataset.preview(images=str(tables["images"]), tile=TILE))
    empty_path = tables["tmp"] / "empty.parquet"
    instances = pd.read_parquet(tables["instances"])
    instances.assign(rle=_rle(100, 200, slice(0, 0), slice(0, 0))).to_parquet(empty_path)
    empty = _decode(MaskParquetDataset(filepath=str(empty_path)).preview(
        images=str(tables["images"]), tile=TILE))
    assert with_masks.shape == empty.shape == (TILE, 3 * TILE, 3)
    changed = np.abs(with_masks - empty).max(axis=-1) > 20
    ys, xs = np.nonzero(changed[:, :TILE])
    assert 0 < len(ys) and xs.min() >= 4 and xs.max() <= 27  # only around the mask


def test_predictions_use_their_own_sizes_and_the_score_threshold(tmp_path):
    square = _rle(40, 40, slice(5, 35), slice(5, 35))
    predictions = pd.DataFrame({"prediction_id": [1, 2], "image_id": [3, 4],
                                "score": [0.9, 0.2], "rle": [square, square],
                                "height": [40, 40], "width": [40, 40]})
    path = tmp_path / "predictions.parquet"
    predictions.to_parquet(path)
    strip = _decode(MaskParquetDataset(filepath=str(path)).preview(tile=TILE))
    assert strip.shape == (TILE, 2 * TILE, 3)  # images are never enlarged: 40 px in 64
    confident, low = strip[12:52, 12:52], strip[12:52, TILE + 12:TILE + 52]
    assert np.abs(confident[10:30, 10:30] - 64).mean() > 30
    assert np.abs(low - 64).max() <= 2  # 0.2 < the default 0.5: not drawn


def test_instances_without_the_images_table_fail_naming_the_file(tables):
    dataset = MaskParquetDataset(filepath=str(tables["instances"]))
    with pytest.raises(ValueError, match=r"instances\.parquet.*preview_args\.images"):
        dataset.preview()


def test_kedro_viz_sees_an_image_preview_and_loads_stay_tables(tables):
    dataset = MaskParquetDataset(filepath=str(tables["instances"]))
    annotation = inspect.signature(dataset.preview).return_annotation
    assert getattr(annotation, "__name__", str(annotation)) == "ImagePreview"
    loaded = dataset.load()
    assert list(loaded["instance_id"]) == [1, 2, 3, 4]
