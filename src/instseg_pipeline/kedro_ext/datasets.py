"""Catalog datasets for what kedro-datasets has no type for: trained torch models, and the
exported ONNX models (`OnnxModelDataset`) and COCO panoptic predictions (a json and a
folder of id PNGs, `PanopticDataset`), on one local versioned-file base; and mask tables
previewed in Kedro-Viz as pictures of their masks (`MaskParquetDataset`).

Pickle is no format for torch models (it ties the file to the code's class layout and
loads arbitrary objects); `TorchModelDataset` stores a plain dict of tensors and simple
types with ``torch.save`` and reads it back with ``weights_only=True``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from glob import glob
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
from kedro.io import AbstractVersionedDataset, DatasetError, Version
from kedro_datasets._typing import ImagePreview
from kedro_datasets.pandas import ParquetDataset
from PIL import Image

from instseg_pipeline.data.masks import id_to_rgb, rgb_to_id
from instseg_pipeline.export.manifest import (
    ManifestError,
    check_digest,
    manifest_path,
    not_exported_reason,
    write_manifest,
)


class LocalVersionedDataset(AbstractVersionedDataset[dict, dict]):
    """A versioned dataset of one local file (``filepath``, optional ``metadata``); the
    subclass writes ``load`` and ``save``."""

    def __init__(self, *, filepath: str, version: Version | None = None,
                 metadata: dict[str, Any] | None = None):
        super().__init__(filepath=PurePosixPath(filepath), version=version,
                         exists_function=os.path.exists, glob_function=glob)
        self.metadata = metadata

    def _exists(self) -> bool:
        try:
            return Path(self._get_load_path()).exists()
        except DatasetError:  # no version saved yet
            return False

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "version": self._version}


class TorchModelDataset(LocalVersionedDataset):
    """A trained model as ``{"config": {...}, "state_dict": {...}, "classes": {...}, ...}``.

    ``config`` is what `instseg_pipeline.models.load_model` needs to rebuild the network.
    Writes go to a temporary file first and are renamed into place, so a crash mid-save
    never leaves a half-written model where a reader would find it.

    Example catalog entry::

        model:
          type: instseg_pipeline.kedro_ext.datasets.TorchModelDataset
          filepath: data/06_models/model.pt
          versioned: true
    """

    def load(self) -> dict:
        # weights_only: a model.pt may be copied in from anywhere (models/torch_files.py)
        from instseg_pipeline.models.torch_files import load_weights_only

        return load_weights_only(self._get_load_path(), "model file")

    def save(self, data: dict) -> None:
        import torch

        path = Path(self._get_save_path())
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        torch.save(data, partial)
        os.replace(partial, path)


class OnnxModelDataset(LocalVersionedDataset):
    """An exported model as ``{"onnx": bytes, "manifest": dict}``, versioned.

    Saves a plain ``<name>.onnx`` (any ONNX tool opens it) and ``<name>.manifest.json``
    beside it in the same version folder; loading checks the bytes against the manifest's
    SHA-256 and raises `ManifestError` on a mismatch. A model of a family that cannot be
    exported is ``{"onnx": None, "manifest": <"exported": false, the reason>}``: its
    version folder holds the manifest alone, so versions are found by their manifests.

    Example catalog entry::

        onnx_model:
          type: instseg_pipeline.kedro_ext.datasets.OnnxModelDataset
          filepath: data/06_models/${globals:source_name}/model.onnx
          versioned: true
    """

    def __init__(self, *, filepath: str, version: Version | None = None,
                 metadata: dict[str, Any] | None = None):
        super().__init__(filepath=filepath, version=version, metadata=metadata)
        # every version folder holds a manifest, a torch-only model's nothing else
        self._glob_function = lambda pattern: glob(str(manifest_path(pattern)))

    def _exists(self) -> bool:
        try:
            return manifest_path(Path(self._get_load_path())).exists()
        except DatasetError:  # no version saved yet
            return False

    def load(self) -> dict:
        path = Path(self._get_load_path())
        try:
            manifest = json.loads(manifest_path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ManifestError(f"{path}: cannot read its manifest ({exc})") from None
        if not_exported_reason(manifest):
            return {"onnx": None, "manifest": manifest}
        data = path.read_bytes()
        check_digest(hashlib.sha256(data).hexdigest(), manifest, str(path))
        return {"onnx": data, "manifest": manifest}

    def save(self, data: dict) -> None:
        path = Path(self._get_save_path())
        path.parent.mkdir(parents=True, exist_ok=True)
        if data["onnx"] is None:  # a torch-only family: the manifest says why
            if not not_exported_reason(data["manifest"]):
                raise DatasetError(f"{path}: no ONNX bytes, and the manifest does not say "
                                   "the model is not exported (\"exported\": false)")
            write_manifest(data["manifest"], manifest_path(path))
            return
        check_digest(hashlib.sha256(data["onnx"]).hexdigest(), data["manifest"], str(path))
        # the manifest first: a reader that finds the .onnx always finds its manifest
        write_manifest({**data["manifest"], "onnx_file": path.name}, manifest_path(path))
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as handle:
            handle.write(data["onnx"])
        os.replace(handle.name, path)


PANOPTIC_JSON = "panoptic.json"
PANOPTIC_PNGS = "panoptic"


def panoptic_paths(folder: str | Path) -> tuple[Path, Path]:
    """(json file, PNG folder) inside one saved `PanopticDataset` folder: what
    ``instseg-eval panoptic --pred-json --pred-folder`` takes."""
    return Path(folder) / PANOPTIC_JSON, Path(folder) / PANOPTIC_PNGS


class PanopticPngs(Mapping):
    """{file_name: int32 [H, W] id map} of a folder of COCO panoptic PNGs, each read when
    asked for (a split's maps need not fit in memory at once)."""

    def __init__(self, folder: Path, names: list[str]):
        self.folder, self._names = Path(folder), list(names)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._names:
            raise KeyError(name)
        with Image.open(self.folder / name) as image:
            return rgb_to_id(np.asarray(image.convert("RGB")))

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class PanopticDataset(LocalVersionedDataset):
    """COCO panoptic predictions, versioned, as a folder holding `PANOPTIC_JSON` and a
    `PANOPTIC_PNGS` folder of RGB id PNGs (id = R + 256 G + 256^2 B, 0 = void).

    Saves ``{"annotations": [{"image_id", "file_name", "segments_info"}], "categories":
    [...], "pngs": {file_name: integer [H, W] id map}}``: one PNG per annotation, named by
    its ``file_name``; the json holds annotations and categories. The folder is written
    beside its final place and renamed into it, so a reader never finds half of it.
    `load` returns the same dict, ``pngs`` read lazily (`PanopticPngs`). `panoptic_paths`
    gives the files ``instseg-eval panoptic`` reads.

    Example catalog entry::

        panoptic_predictions:
          type: instseg_pipeline.kedro_ext.datasets.PanopticDataset
          filepath: data/07_model_output/${globals:source_name}/panoptic_predictions
          versioned: true
    """

    def _exists(self) -> bool:
        try:
            return panoptic_paths(self._get_load_path())[0].exists()
        except DatasetError:  # no version saved yet
            return False

    def load(self) -> dict:
        json_path, png_folder = panoptic_paths(self._get_load_path())
        data = json.loads(json_path.read_text(encoding="utf-8"))
        names = [str(a["file_name"]) for a in data["annotations"]]
        return {**data, "pngs": PanopticPngs(png_folder, names)}

    def save(self, data: dict) -> None:
        missing = [k for k in ("annotations", "categories", "pngs") if k not in data]
        if missing:
            raise DatasetError(f"panoptic predictions lack keys {missing}")
        _check_png_names(data["annotations"], data["pngs"])
        path = Path(self._get_save_path())
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
        partial.chmod(0o755)  # mkdtemp's 0o700 would stay on the renamed folder
        try:
            json_path, png_folder = panoptic_paths(partial)
            png_folder.mkdir()
            for name in data["pngs"]:
                pixels = id_to_rgb(np.asarray(data["pngs"][name]))
                Image.fromarray(pixels).save(png_folder / name)
            payload = {k: v for k, v in data.items() if k != "pngs"}
            json_path.write_text(json.dumps(payload), encoding="utf-8")
            _replace_folder(partial, path)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise


def _replace_folder(new: Path, path: Path) -> None:
    """Move folder ``new`` to ``path``; an unversioned dataset's earlier folder there is
    moved aside first and deleted after (a rename cannot replace a non-empty folder)."""
    if not path.exists():
        os.replace(new, path)
        return
    old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old."))
    os.replace(path, old / path.name)
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)


def _check_png_names(annotations: list, pngs: Mapping) -> None:
    """One id map per annotation, named by its file_name, and no other."""
    named = {str(a["file_name"]): a.get("image_id") for a in annotations}
    unsafe = [n for n in named if PurePosixPath(n).name != n or n in ("", ".", "..")]
    if unsafe:
        raise DatasetError(f"panoptic predictions: PNG file names {unsafe[:10]} are not plain "
                           "file names")
    without = [f"image {i} ({n})" for n, i in named.items() if n not in pngs]
    if without:
        raise DatasetError(f"panoptic predictions: no id map for {', '.join(without[:10])}")
    extra = sorted(set(pngs) - set(named))
    if extra:
        raise DatasetError(f"panoptic predictions: id maps {extra[:10]} belong to no "
                           "annotation")


class MaskParquetDataset(ParquetDataset):
    """A pandas ``ParquetDataset`` of a table with an ``rle`` mask column (``instances``,
    ``predictions``) whose Kedro-Viz preview is a picture of its masks.

    `preview` draws the masks of the table's first images, each image fitted into a
    ``tile`` x ``tile`` square, side by side in one PNG (at most ``max_images * tile`` by
    ``tile`` pixels). Catalog entry, with the preview arguments Kedro-Viz passes::

        instances:
          type: instseg_pipeline.kedro_ext.datasets.MaskParquetDataset
          filepath: data/03_primary/${globals:source_name}/instances.parquet
          metadata:
            kedro-viz:
              preview_args:
                images: data/03_primary/${globals:source_name}/images.parquet
                root: data/01_raw/${globals:source_name}
    """

    def preview(self, images: str | None = None, root: str | None = None,
                max_images: int = 4, tile: int = 160,
                score_threshold: float = 0.5) -> ImagePreview:
        """Base64 PNG of the masks of the first ``max_images`` images of the table.

        images: path of the ``images`` table; gives each image's size and file (required
            when the table has no ``height`` / ``width`` columns, as ``instances``).
        root: the source root the images' ``file_name`` is relative to; an image is drawn
            on its pixels when its file is there, else on a grey canvas of its size.
        score_threshold: rows with a ``score`` below it are left out (predictions).
        """
        from instseg_pipeline.viz.previews import image_frames, mask_strip, png_base64

        ids = self._read(columns=["image_id"])["image_id"].drop_duplicates()
        ids = [int(i) for i in ids.iloc[:max_images]]
        rows = self._read(filters=[("image_id", "in", ids)]) if ids else self._read()
        table = pd.read_parquet(images) if images is not None else None
        frames = image_frames(rows, ids, table, str(self._filepath))
        if "score" in rows.columns:
            rows = rows[rows["score"] >= score_threshold]
        return ImagePreview(png_base64(mask_strip(rows, frames, root, tile)))

    def _read(self, **load_args) -> pd.DataFrame:
        """Part of the table (``columns`` / ``filters`` of `pandas.read_parquet`)."""
        load_path = str(self._get_load_path())
        if self._protocol == "file":
            return pd.read_parquet(load_path, **load_args)
        return pd.read_parquet(f"{self._protocol}://{load_path}",
                               storage_options=self._storage_options, **load_args)
