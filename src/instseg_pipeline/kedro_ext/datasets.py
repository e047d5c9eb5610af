"""Catalog datasets for what kedro-datasets has no type for: trained torch models, and the
exported ONNX models (`OnnxModelDataset`), on one local versioned-file base.

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

from kedro.io import AbstractVersionedDataset, DatasetError, Version

from instseg_pipeline.export.manifest import (
    ManifestError,
    check_digest,
    manifest_path,
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
    SHA-256 and raises `ManifestError` on a mismatch.

    Example catalog entry::

        onnx_model:
          type: instseg_pipeline.kedro_ext.datasets.OnnxModelDataset
          filepath: data/06_models/${globals:source_name}/model.onnx
          versioned: true
    """

    def load(self) -> dict:
        path = Path(self._get_load_path())
        data = path.read_bytes()
        try:
            manifest = json.loads(manifest_path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ManifestError(f"{path}: cannot read its manifest ({exc})") from None
        check_digest(hashlib.sha256(data).hexdigest(), manifest, str(path))
        return {"onnx": data, "manifest": manifest}

    def save(self, data: dict) -> None:
        path = Path(self._get_save_path())
        path.parent.mkdir(parents=True, exist_ok=True)
        check_digest(hashlib.sha256(data["onnx"]).hexdigest(), data["manifest"], str(path))
        # the manifest first: a reader that finds the .onnx always finds its manifest
        write_manifest({**data["manifest"], "onnx_file": path.name}, manifest_path(path))
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as handle:
            handle.write(data["onnx"])
        os.replace(handle.name, path)
