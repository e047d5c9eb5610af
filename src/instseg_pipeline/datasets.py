"""Catalog datasets for what kedro-datasets has no type for: trained torch models.

Pickle is no format for torch models (it ties the file to the code's class layout and
loads arbitrary objects); `TorchModelDataset` stores a plain dict of tensors and simple
types with ``torch.save`` and reads it back with ``weights_only=True``.
"""
from __future__ import annotations

import os
from glob import glob
from pathlib import Path, PurePosixPath
from typing import Any

from kedro.io import AbstractVersionedDataset, Version


class TorchModelDataset(AbstractVersionedDataset[dict, dict]):
    """A trained model as ``{"config": {...}, "state_dict": {...}, "classes": {...}, ...}``.

    ``config`` is what `instseg_pipeline.models.load_model` needs to rebuild the network.
    Writes go to a temporary file first and are renamed into place, so a crash mid-save
    never leaves a half-written model where a reader would find it.

    Example catalog entry::

        model:
          type: instseg_pipeline.datasets.TorchModelDataset
          filepath: data/06_models/model.pt
          versioned: true
    """

    def __init__(self, *, filepath: str, version: Version | None = None,
                 metadata: dict[str, Any] | None = None):
        super().__init__(filepath=PurePosixPath(filepath), version=version,
                         exists_function=os.path.exists, glob_function=glob)
        self.metadata = metadata

    def load(self) -> dict:
        import torch

        return torch.load(self._get_load_path(), map_location="cpu", weights_only=True)

    def save(self, data: dict) -> None:
        import torch

        path = Path(self._get_save_path())
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        torch.save(data, partial)
        os.replace(partial, path)

    def _exists(self) -> bool:
        try:
            return Path(self._get_load_path()).exists()
        except Exception:  # noqa: BLE001 - no version saved yet
            return False

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "version": self._version}
