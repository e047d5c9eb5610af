"""`instseg-eval coco` run as a user would: a subprocess printing a table, or JSON with --json."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from coco_fixtures import REFERENCE, fake_paths

from instseg_pipeline.evaluation.coco import STAT_NAMES

CONSOLE_SCRIPT = Path(sys.executable).parent / "instseg-eval"
MODULE = [sys.executable, "-m", "instseg_pipeline.commands.evaluate"]


def _entry_points() -> list[list[str]]:
    points = [MODULE]
    if CONSOLE_SCRIPT.exists():
        points.append([str(CONSOLE_SCRIPT)])
    return points


def _run(command: list[str], *args) -> subprocess.CompletedProcess:
    return subprocess.run([*command, "coco", *map(str, args)], capture_output=True, text=True,
                          timeout=120, check=False)


@pytest.mark.parametrize("command", _entry_points(), ids=lambda c: Path(c[-1]).name)
@pytest.mark.parametrize("iou_type, backend",
                         [("segm", "faster-coco-eval"), ("bbox", "pycocotools")])
def test_prints_one_json_object_with_reference_numbers(fake_results_dir, command, iou_type,
                                                       backend):
    gt, results = fake_paths(fake_results_dir, iou_type)
    done = _run(command, "--gt", gt, "--results", results, "--iou-type", iou_type,
                "--backend", backend, "--json")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1, f"stdout must hold only the JSON object, got {done.stdout!r}"
    stats = json.loads(lines[0])
    assert list(stats) == list(STAT_NAMES)
    for name, expected in zip(STAT_NAMES, REFERENCE[iou_type], strict=True):
        assert stats[name] == pytest.approx(expected, abs=1e-10), name


def test_default_backend_is_used(fake_results_dir):
    gt, results = fake_paths(fake_results_dir, "bbox")
    done = _run(MODULE, "--gt", gt, "--results", results, "--iou-type", "bbox", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["mAP"] == pytest.approx(REFERENCE["bbox"][0], abs=1e-10)


@pytest.mark.parametrize("command", _entry_points(), ids=lambda c: Path(c[-1]).name)
def test_bad_files_exit_2_naming_the_file(fake_results_dir, tmp_path, command):
    gt, _ = fake_paths(fake_results_dir, "bbox")
    broken = tmp_path / "broken_results.json"
    broken.write_text("[{\"image_id\": 1,")
    missing = tmp_path / "absent_gt.json"
    foreign = tmp_path / "unknown_images.json"
    foreign.write_text(json.dumps([{"image_id": 123456789, "category_id": 1, "score": 0.5,
                                    "bbox": [0, 0, 5, 5]}]))
    for args, named in (((gt, broken), broken), ((missing, broken), missing),
                        ((gt, foreign), "123456789")):
        done = _run(command, "--gt", args[0], "--results", args[1], "--iou-type", "bbox")
        assert done.returncode == 2, done.stderr
        assert done.stdout == ""
        assert str(named) in done.stderr


@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_table_by_default_names_every_stat_with_its_value(fake_results_dir, iou_type):
    gt, results = fake_paths(fake_results_dir, iou_type)
    done = _run(MODULE, "--gt", gt, "--results", results, "--iou-type", iou_type)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"COCO {iou_type}")
    assert lines[1].split() == ["stat", "kind", "IoU", "area", "maxDets", "value"]
    rows = {line.split()[0]: line.split() for line in lines[3:]}
    assert list(rows) == list(STAT_NAMES)
    for name, expected in zip(STAT_NAMES, REFERENCE[iou_type], strict=True):
        shown = rows[name][-1]
        assert shown == ("n/a" if expected < 0 else f"{expected:.4f}"), name
    assert rows["AR_10"][1:5] == ["AR", "0.50:0.95", "all", "10"]
    assert rows["mAP_75"][1:5] == ["AP", "0.75", "all", "100"]


def test_command_imports_no_torch_mlflow_or_kedro(fake_results_dir):
    gt, results = fake_paths(fake_results_dir, "bbox")
    probe = ("import sys; from instseg_pipeline.commands.evaluate import main; "
             f"main(['coco', '--gt', {str(gt)!r}, '--results', {str(results)!r}, "
             "'--iou-type', 'bbox']); "
             "print(sorted(m for m in ('torch', 'mlflow', 'kedro') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"
