"""A throwaway copy of the project for tests that run Kedro, and tiny run parameters."""
from __future__ import annotations

import shutil
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# The default chain at tiny size: seconds instead of minutes.
TINY = {
    "source": {"synthetic": {"num_images": 14, "min_size": 96, "max_size": 128}},
    "ingestion": {"val_fraction": 0.3},
    "training": {"max_iters": 4, "batch_size": 2, "checkpoint_every": 2, "warmup_iters": 2,
                 "log_every": 2, "val_max_images": 2, "preview_samples": 2,
                 "progress_bar": False,
                 "model": {"min_size": 96, "max_size": 128}},
    "evaluation": {"batch_size": 2},
}


def copy_project(root: Path) -> Path:
    """The project's configuration under ``root/project``, so runs write their data there.

    Kedro resolves catalog paths against the project root; the package itself is installed.
    """
    project = root / "project"
    project.mkdir()
    for name in ("pyproject.toml", ".telemetry"):
        shutil.copy(REPO_ROOT / name, project / name)
    shutil.copytree(REPO_ROOT / "conf", project / "conf")
    (project / "src").mkdir()  # the package is imported from its installed location
    return project
