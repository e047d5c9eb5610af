"""Catalog datasets for what kedro-datasets has no type for: trained torch models, and the
exported ONNX models (`OnnxModelDataset`), on one local versioned-file base; and mask
tables previewed in Kedro-Viz as pictures of their masks (`MaskParquetDataset`).

Pickle is no format for torch models (it ties the file to the code's class layout and
loads arbitrary objects); `TorchModelDataset` stores a plain dict of tensors and simple
types with ``torch.save`` and reads it back with ``weights_only=True``.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from glob import glob
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd
from kedro.io import AbstractVersionedDataset, DatasetError, Version
from kedro_datasets._typing import ImagePreview
from kedro_datasets.pandas import ParquetDataset

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
