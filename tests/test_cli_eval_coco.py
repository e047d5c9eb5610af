"""`instseg-eval coco` run as a user would: a subprocess that prints one JSON object."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from instseg_pipeline.metrics.coco import STAT_NAMES

# cocoapi results/val2014_fake_eval_res.txt at full precision (see the data's SOURCE.md)
REFERENCE = {
    "bbox": [0.5045806987249628, 0.6969727247299577, 0.5729816669904824, 0.5856257209410443,
             0.5193996948036719, 0.5013978986347466, 0.38681277964578054, 0.5936795762842003,
             0.595352982877607, 0.6398109626113442, 0.5664205978994309, 0.5642905982905982],
    "segm": [0.3195452758576433, 0.5622883972521636, 0.29892653412086784, 0.3873740315997838,
             0.31018272403369485, 0.3269339071005138, 0.2682297225711534, 0.41544868114906375,
             0.4168394992198818, 0.4694498622754236, 0.37675922666197265, 0.3814715099715099],
}
RESULT_FILES = {"bbox": "instances_val2014_fakebbox100_results.json",
                "segm": "instances_val2014_fakesegm100_results.json"}
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
    gt = fake_results_dir / "ground_truth" / "instances_val2014_100.json"
    results = fake_results_dir / "results" / RESULT_FILES[iou_type]
    done = _run(command, "--gt", gt, "--results", results, "--iou-type", iou_type,
                "--backend", backend)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1, f"stdout must hold only the JSON object, got {done.stdout!r}"
    stats = json.loads(lines[0])
    assert list(stats) == list(STAT_NAMES)
    for name, expected in zip(STAT_NAMES, REFERENCE[iou_type], strict=True):
        assert stats[name] == pytest.approx(expected, abs=1e-10), name


def test_default_backend_is_used(fake_results_dir):
    gt = fake_results_dir / "ground_truth" / "instances_val2014_100.json"
    results = fake_results_dir / "results" / RESULT_FILES["bbox"]
    done = _run(MODULE, "--gt", gt, "--results", results, "--iou-type", "bbox")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["mAP"] == pytest.approx(REFERENCE["bbox"][0], abs=1e-10)


@pytest.mark.parametrize("command", _entry_points(), ids=lambda c: Path(c[-1]).name)
def test_bad_files_exit_2_naming_the_file(fake_results_dir, tmp_path, command):
    gt = fake_results_dir / "ground_truth" / "instances_val2014_100.json"
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
