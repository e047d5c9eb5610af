"""A model family that cannot be exported to ONNX, for the fallbacks of the export pipeline,
serving and the model comparison: maskrcnn_tiny's network under another name, with
``OnnxSpec(exportable=False)``. Registered in a copy of the registry, so that no other test
sees it."""
from __future__ import annotations

import dataclasses

import pytest

from instseg_pipeline.models import OnnxSpec, registry

TORCH_ONLY = "torchonly_tiny"
NOTE = "test family: its mask head stands for an op ONNX cannot express"


@pytest.fixture
def torch_only_family(monkeypatch):
    """The registered torch-only `ModelFamily`."""
    monkeypatch.setattr(registry, "FAMILIES", dict(registry.FAMILIES))
    entry = dataclasses.replace(registry.family("maskrcnn_tiny"), name=TORCH_ONLY,
                                onnx=OnnxSpec(exportable=False, note=NOTE))
    return registry.register(entry)
