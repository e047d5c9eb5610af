"""DVC as CI and users run it, in a fresh clone: `KEDRO_ENV=ci dvc repro` runs every stage,
a second repro runs none, one edited parameter reruns only its stage and those downstream;
raw data tracked with `dvc add` survives a push / delete / pull round trip."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STAGES = ["synthetic", "ingestion", "training", "evaluation", "export"]

pytestmark = pytest.mark.slow


def _env() -> dict:
    return {**os.environ, "KEDRO_ENV": "ci", "INSTSEG_MLFLOW": "off", "DVC_NO_ANALYTICS": "1",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "COLUMNS": "200"}


def _dvc(clone: Path, *args: str) -> str:
    result = subprocess.run([str(BIN / "dvc"), *args], cwd=clone, env=_env(),
                            capture_output=True, text=True, timeout=900, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{output[-4000:]}"
    return output


def _ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([a-z_]+)'", output)


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    target = tmp_path_factory.mktemp("dvc") / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(target)], check=True)
    return target


def test_repro_runs_all_then_nothing_then_only_downstream(clone):
    first = _dvc(clone, "repro")
    assert _ran(first) == STAGES
    assert (clone / "dvc.lock").exists()
    assert list((clone / "data/08_reporting/ci/coco_metrics.json").iterdir())
    assert list((clone / "data/06_models/ci/model.onnx").iterdir())

    second = _dvc(clone, "repro")
    assert _ran(second) == [], second

    params = clone / "conf/ci/parameters_training.yml"
    params.write_text(params.read_text().replace("max_iters: 40", "max_iters: 50"))
    third = _dvc(clone, "repro")
    assert _ran(third) == ["training", "evaluation", "export"]


def test_raw_data_round_trip_through_a_local_remote(clone, tmp_path):
    from coco_fixtures import make_coco

    raw = clone / "data/01_raw/coco_small"
    make_coco(raw, n_images=4)
    before = _digest(raw)
    _dvc(clone, "add", "data/01_raw/coco_small")
    assert (clone / "data/01_raw/coco_small.dvc").exists()
    _dvc(clone, "remote", "add", "-f", "-d", "local", str(tmp_path / "remote"))
    _dvc(clone, "push", "data/01_raw/coco_small.dvc")
    shutil.rmtree(raw)
    shutil.rmtree(clone / ".dvc/cache")
    _dvc(clone, "pull", "data/01_raw/coco_small.dvc")
    assert _digest(raw) == before
