"""Untrusted torch files: every loader of a checkpoint or model file refuses pickled Python
objects (a class instance, an ``os.system`` ``__reduce__``) before running them, with an
error naming the file; plain tensor files still load."""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from kedro.io import DatasetError

from instseg_pipeline.engine.checkpoint import _CKPT_KEYS, CheckpointError, load_checkpoint
from instseg_pipeline.kedro_ext.datasets import TorchModelDataset
from instseg_pipeline.models import WeightsError
from instseg_pipeline.models.torch_files import (
    UnreadableFileError,
    UnsafeFileError,
    load_weights_only,
)
from instseg_pipeline.models.weights import read_state_dict
from instseg_pipeline.predict.predictor import Predictor

SYSTEM = f"{os.system.__module__}.system"  # posix.system on Linux


class ShellOnLoad:
    """Unpickling it runs ``touch <marker>``: proof that a loader executed the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class Thing:
    """A harmless class instance: still code the loader would have to import."""


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "executed"


def named(path: Path) -> str:
    """``path`` as a regular expression matching itself."""
    return re.escape(str(path))


def _save(path: Path, payload) -> Path:
    torch.save(payload, path)
    return path


def _model_dict(extra) -> dict:
    return {"config": {"name": "maskrcnn_tiny"}, "state_dict": {"w": torch.zeros(2)},
            "classes": {1: "a"}, "iterations": 1, "extra": extra}


def test_loader_refuses_a_reduce_to_os_system_and_names_the_global(tmp_path, marker):
    path = _save(tmp_path / "evil.pt", {"w": torch.zeros(2), "x": ShellOnLoad(marker)})
    with pytest.raises(UnsafeFileError) as caught:
        load_weights_only(path, "checkpoint")
    message = str(caught.value)
    assert message.startswith(f"checkpoint {path}: refused, it holds pickled Python objects")
    assert SYSTEM in message and "weights_only=True" in message
    assert "allowlist" not in message  # torch's advice to trust the file is not passed on
    assert not marker.exists()


def test_loader_refuses_a_class_instance_and_a_raw_pickle(tmp_path, marker):
    instance = _save(tmp_path / "thing.pt", {"w": torch.zeros(2), "x": Thing()})
    with pytest.raises(UnsafeFileError, match=rf"{named(instance)}: refused.*{__name__}\.Thing"):
        load_weights_only(instance)
    raw = tmp_path / "legacy.pkl"
    raw.write_bytes(pickle.dumps({"x": ShellOnLoad(marker)}))
    with pytest.raises(UnsafeFileError, match=rf"{named(raw)}: refused, it is not a plain "
                       r"tensor file \(the weights_only reader stopped at: Unsupported"):
        load_weights_only(raw)
    assert not marker.exists()


def test_loader_reads_tensors_and_names_damaged_files(tmp_path):
    good = _save(tmp_path / "good.pt", {"w": torch.ones(3), "meta": {"n": 1, "s": "x"}})
    loaded = load_weights_only(good)
    assert torch.equal(loaded["w"], torch.ones(3)) and loaded["meta"] == {"n": 1, "s": "x"}
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(UnreadableFileError, match=rf"model file {named(truncated)}: cannot be "
                       r"read as a torch file \(truncated or corrupt\?\)"):
        load_weights_only(truncated, "model file")
    junk = tmp_path / "junk.pt"  # to the pickle reader, junk and a raw pickle look alike
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=rf"model file {named(junk)}: (refused|cannot be read)"):
        load_weights_only(junk, "model file")
    with pytest.raises(FileNotFoundError):
        load_weights_only(tmp_path / "absent.pt")


def test_engine_checkpoint_loader_refuses_pickled_objects(tmp_path, marker):
    state = {key: 0 for key in _CKPT_KEYS}
    state["history"] = [ShellOnLoad(marker)]
    path = _save(tmp_path / "ckpt_00000002.pt", state)
    with pytest.raises(CheckpointError, match=rf"checkpoint {named(path)}: refused.*{SYSTEM}"):
        load_checkpoint(path)
    assert not marker.exists()


def test_predictor_model_loader_refuses_pickled_objects(tmp_path, marker):
    path = _save(tmp_path / "model.pt", _model_dict(ShellOnLoad(marker)))
    with pytest.raises(UnsafeFileError, match=rf"model file {named(path)}: refused.*{SYSTEM}"):
        Predictor.from_checkpoint(path, device="cpu")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(_save(tmp_path / "plain.pt", _model_dict(1)).read_bytes()[:300])
    with pytest.raises(ValueError, match=rf"model file {named(truncated)}: cannot be read"):
        Predictor.from_checkpoint(truncated, device="cpu")
    assert not marker.exists()


def test_catalog_model_dataset_refuses_pickled_objects(tmp_path, marker):
    path = _save(tmp_path / "model.pt", _model_dict(Thing()))
    with pytest.raises(DatasetError, match=rf"model file {named(path)}: refused"):
        TorchModelDataset(filepath=str(path)).load()


def test_pretrained_weights_loader_refuses_pickled_objects(tmp_path, marker):
    path = _save(tmp_path / "weights.pth", {"model": {"w": torch.zeros(2)},
                                             "x": ShellOnLoad(marker)})
    with pytest.raises(WeightsError, match=rf"weights file {named(path)}: refused.*{SYSTEM}"):
        read_state_dict(path)
    assert not marker.exists()


def test_sam_checkpoint_loader_refuses_pickled_objects(tmp_path, marker):
    interactive = pytest.importorskip("instseg_pipeline.serving.interactive")
    path = _save(tmp_path / "sam.pth", {"state_dict": {}, "config": ShellOnLoad(marker)})
    with pytest.raises(UnsafeFileError, match=rf"SAM checkpoint {named(path)}: refused"):
        interactive.load_sam(path, device="cpu")
    assert not marker.exists()
