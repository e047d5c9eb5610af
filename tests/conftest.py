"""Shared fixtures. Data beside the checkout is found at ../shared/data (or
$INSTSEG_SHARED_DATA); tests that need it skip with a message naming the path."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("INSTSEG_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

for _key, _value in {"KEDRO_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1",
                     "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1",
                     "GRADIO_ANALYTICS_ENABLED": "False"}.items():
    os.environ.setdefault(_key, _value)


_BASELINE_HANDLERS = list(logging.getLogger().handlers)


def _drop_session_handlers() -> None:
    root = logging.getLogger()
    for handler in root.handlers[:]:
        if handler not in _BASELINE_HANDLERS and not type(handler).__module__.startswith(
                "_pytest"):
            root.removeHandler(handler)


@pytest.fixture(autouse=True)
def _restore_root_logging():
    """A KedroSession installs Kedro's logging config (a console handler on the root
    logger), also from module-scoped fixtures; tests that read stdout must not see its
    log lines. pytest's own capture handlers stay."""
    _drop_session_handlers()
    yield
    _drop_session_handlers()


def _shared(sub: str) -> Path:
    path = SHARED_DATA / sub
    if not path.exists():
        pytest.skip(f"shared data not found at {path} (set INSTSEG_SHARED_DATA to its folder)")
    return path


@pytest.fixture(scope="session")
def coco128_dir() -> Path:
    """../shared/data/coco128 (128 COCO train2017 images, instances + panoptic json)."""
    return _shared("coco128")


@pytest.fixture(scope="session")
def fake_results_dir() -> Path:
    """../shared/data/cocoapi-fake-results (GT, fake results, reference numbers)."""
    return _shared("cocoapi-fake-results")


@pytest.fixture
def kedro_project(tmp_path) -> Path:
    """A copy of the project's configuration in tmp_path, so runs write their data there."""
    from kedro_fixtures import copy_project

    return copy_project(tmp_path)
