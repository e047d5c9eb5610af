"""scripts/update_readme_results.py on a fake outputs tree: the newest versions fill the
table, figures are copied and linked, a second run changes nothing, and nothing outside
the markers is touched."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "scripts" / "update_readme_results.py"
OLD, NEW = "2026-01-01T10.00.00.000Z", "2026-01-02T09.30.00.000Z"
BEFORE = "# project\n\nSome text.\n\n## Results\n\n"
AFTER = "\n\n## Later section\n\nMore text <!-- not a marker -->.\n"


def _coco(segm: float, bbox: float) -> dict:
    def stats(ap: float) -> dict:
        return {"mAP": ap, "mAP_50": ap + 0.2, "mAP_75": ap - 0.05, "mAP_large": -1.0}
    return {"segm": stats(segm), "bbox": stats(bbox)}


def _save(reporting: Path, name: str, version: str, write) -> Path:
    path = reporting / name / version / name
    path.parent.mkdir(parents=True, exist_ok=True)
    write(path)
    return path


def _json(value):
    return lambda path: path.write_text(json.dumps(value))


def _png(color: tuple[int, int, int]):
    return lambda path: Image.fromarray(np.full((4, 6, 3), color, np.uint8)).save(path)


@pytest.fixture
def outputs(tmp_path) -> Path:
    """A project folder with two versions of each report; the newer one is the truth."""
    reporting = tmp_path / "project" / "data" / "08_reporting" / "synthetic"
    for version, (segm, bbox) in ((OLD, (0.1, 0.15)), (NEW, (0.4321, 0.5678))):
        _save(reporting, "coco_metrics.json", version, _json(_coco(segm, bbox)))
    _save(reporting, "pq_metrics.json", NEW, _json(
        {"all": {"pq": 0.3456, "sq": 0.8, "rq": 0.432}, "things": {"pq": 0.3456}}))
    _save(reporting, "cityscapes_metrics.json", NEW, _json({"AP": 0.2345, "AP50": 0.5432}))
    _save(reporting, "data_quality_report.json", NEW, _json(
        {"images": 120, "instances": 385, "crowd_instances": 12}))
    history = pd.DataFrame({"iteration": np.arange(400), "loss": 1.0,
                            "time": np.full(400, 0.5)})
    _save(reporting, "training_history.parquet", NEW, history.to_parquet)
    for name in ("training_curves.png", "dataset_statistics.png",
                 "performance_dashboard.png", "augmentation_preview.png"):
        _save(reporting, name, OLD, _png((0, 0, 0)))
        _save(reporting, name, NEW, _png((200, 30, 30)))
    return tmp_path / "project"


def _run(project: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--project", str(project), *extra],
                          capture_output=True, text=True, timeout=120, check=False)


def _block(text: str) -> str:
    return text.split("<!-- results:start -->")[1].split("<!-- results:end -->")[0]


def test_table_holds_the_newest_outputs_and_links_the_figures(outputs):
    readme = outputs / "README.md"
    readme.write_text(BEFORE + "<!-- results:start -->\nstale\n<!-- results:end -->" + AFTER)
    result = _run(outputs)
    assert result.returncode == 0, result.stderr
    block = _block(readme.read_text())
    assert "| mask (segm) | 0.432 | 0.632 | 0.382 |" in block
    assert "| box (bbox) | 0.568 | 0.768 | 0.518 |" in block
    assert "| 0.346 | 0.800 | 0.432 | 0.234 | 0.543 | 400 | 3.3 min | 120 | 385 (12 crowd) |" \
        in block
    assert NEW in block and "stale" not in block and "0.100" not in block
    links = [line for line in block.splitlines() if line.startswith("![")]
    assert links == ["![dataset statistics](docs/results/dataset_statistics.png)",
                     "![training curves](docs/results/training_curves.png)",
                     "![performance dashboard](docs/results/performance_dashboard.png)"]
    reporting = outputs / "data/08_reporting/synthetic"
    for name in ("dataset_statistics.png", "training_curves.png", "performance_dashboard.png"):
        copied = outputs / "docs/results" / name
        assert copied.read_bytes() == (reporting / name / NEW / name).read_bytes(), name
    assert not (outputs / "docs/results/augmentation_preview.png").exists()


def test_second_run_is_idempotent_and_text_outside_the_markers_is_kept(outputs):
    readme = outputs / "README.md"
    readme.write_text(BEFORE + "<!-- results:start -->\n<!-- results:end -->" + AFTER)
    assert _run(outputs).returncode == 0
    first = readme.read_bytes()
    second_run = _run(outputs)
    assert second_run.returncode == 0 and readme.read_bytes() == first
    assert "unchanged" in second_run.stderr
    text = first.decode()
    assert text.startswith(BEFORE + "<!-- results:start -->")
    assert text.endswith("<!-- results:end -->" + AFTER)


def test_without_markers_the_block_is_appended_under_a_results_heading(outputs, tmp_path):
    readme = tmp_path / "elsewhere" / "README.md"
    readme.parent.mkdir()
    readme.write_text("# project\n\nNo results yet.\n")
    result = _run(outputs, "--readme", str(readme), "--source-name", "synthetic")
    assert result.returncode == 0, result.stderr
    text = readme.read_text()
    assert text.startswith("# project\n\nNo results yet.\n\n## Results\n\n<!-- results:start -->")
    assert text.endswith("<!-- results:end -->\n")
    # links are relative to the README, wherever it lives
    assert "(../project/docs/results/training_curves.png)" in text
    assert _run(outputs, "--readme", str(readme)).returncode == 0
    assert readme.read_text() == text and text.count("## Results") == 1


def test_missing_outputs_and_broken_markers_are_errors_that_name_the_problem(outputs):
    result = _run(outputs, "--source-name", "coco")
    assert result.returncode == 1 and "data/08_reporting/coco" in result.stderr
    readme = outputs / "README.md"
    readme.write_text("<!-- results:end -->\ntext\n<!-- results:start -->\n")
    result = _run(outputs)
    assert result.returncode == 1 and "marker" in result.stderr
    assert readme.read_text() == "<!-- results:end -->\ntext\n<!-- results:start -->\n"


def test_undefined_coco_values_and_missing_reports_show_dashes(outputs):
    reporting = outputs / "data/08_reporting/synthetic"
    newest = reporting / "coco_metrics.json" / NEW / "coco_metrics.json"
    newest.write_text(json.dumps({"segm": {"mAP": -1.0, "mAP_50": 0.5, "mAP_75": -1.0}}))
    for name in ("pq_metrics.json", "cityscapes_metrics.json", "training_history.parquet"):
        shutil.rmtree(reporting / name)
    readme = outputs / "README.md"  # absent: created with the block alone
    assert _run(outputs).returncode == 0
    assert readme.read_text().startswith("## Results\n\n<!-- results:start -->")
    block = _block(readme.read_text())
    assert "| mask (segm) | – | 0.500 | – |" in block
    assert "| box (bbox) | – | – | – |" in block
    assert "| – | – | – | – | – | – | – | 120 | 385 (12 crowd) |" in block
