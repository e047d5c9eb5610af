"""The error scene (`error_scene`) on disk, evaluated once per test module."""
from __future__ import annotations

import pytest
from error_scene import build_scene, without_predictions


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    return build_scene(tmp_path_factory.mktemp("viz_dataset"))


@pytest.fixture(scope="module")
def empty(data) -> dict:
    """The same dataset with no predictions at all."""
    return without_predictions(data)
