"""`instseg-eval panoptic` run as a subprocess on a few coco128 val images."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from instseg_pipeline.evaluation.panoptic import pq_from_files, read_id_map, write_id_map


def _eval(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "instseg_pipeline.commands.evaluate", "panoptic", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120,
                          check=False)


@pytest.fixture()
def files(coco128_dir, tmp_path) -> dict[str, Path]:
    """GT json of 3 val images (PNGs in the shared folder) and a prediction that lost the
    first segment of each image (its pixels left void), written into tmp_path."""
    annotations = coco128_dir / "annotations"
    gt = json.loads((annotations / "panoptic_val2017.json").read_text())
    gt["annotations"] = gt["annotations"][:3]
    gt_folder, pred_folder = annotations / "panoptic_val2017", tmp_path / "pred"
    pred_folder.mkdir()
    predictions = []
    for ann in gt["annotations"]:
        ids = read_id_map(gt_folder / ann["file_name"])
        ids[ids == ann["segments_info"][0]["id"]] = 0
        write_id_map(pred_folder / ann["file_name"], ids)
        predictions.append({**ann, "segments_info": ann["segments_info"][1:]})
    paths = {"gt_json": tmp_path / "gt.json", "gt_folder": gt_folder,
             "pred_json": tmp_path / "pred.json", "pred_folder": pred_folder}
    paths["gt_json"].write_text(json.dumps(gt))
    paths["pred_json"].write_text(json.dumps({"annotations": predictions}))
    return paths


def _args(paths: dict[str, Path]) -> list[str]:
    return ["--gt-json", str(paths["gt_json"]), "--gt-folder", str(paths["gt_folder"]),
            "--pred-json", str(paths["pred_json"]), "--pred-folder", str(paths["pred_folder"])]


def test_prints_three_groups_of_fractions(files):
    done = _eval(*_args(files), "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert set(result) == {"all", "things", "stuff"}
    for group in result.values():
        assert set(group) == {"pq", "sq", "rq", "n"}
        assert all(0.0 <= group[key] <= 1.0 for key in ("pq", "sq", "rq"))
        assert isinstance(group["n"], int) and group["n"] > 0
    assert result["all"]["rq"] < 1.0  # three segments are missing
    assert result == pq_from_files(*files.values())


def test_missing_file_exits_2_naming_it(files, tmp_path):
    files["pred_json"] = tmp_path / "no_such_predictions.json"
    done = _eval(*_args(files))
    assert done.returncode == 2
    assert "no_such_predictions.json" in done.stderr and done.stdout == ""


def test_unreadable_json_exits_2_naming_it(files):
    files["gt_json"].write_text("{broken")
    done = _eval(*_args(files))
    assert done.returncode == 2
    assert str(files["gt_json"]) in done.stderr


def test_missing_png_exits_2_naming_it(files):
    name = next(files["pred_folder"].iterdir())
    name.unlink()
    done = _eval(*_args(files))
    assert done.returncode == 2
    assert str(name) in done.stderr


def test_table_by_default_shows_pq_sq_rq_per_group(files):
    done = _eval(*_args(files))
    assert done.returncode == 0, done.stderr
    expected = pq_from_files(*files.values())
    lines = done.stdout.splitlines()
    assert lines[0] == "Panoptic quality"
    assert lines[1].split() == ["group", "PQ", "SQ", "RQ", "n"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[3:]}
    assert list(rows) == ["all", "things", "stuff"]
    for group, values in expected.items():
        assert rows[group] == [f"{values[k]:.4f}" for k in ("pq", "sq", "rq")] \
            + [str(values["n"])]


def test_pred_dir_reads_a_saved_predictions_folder(files, tmp_path):
    saved = tmp_path / "saved"
    saved.mkdir()
    shutil.copy(files["pred_json"], saved / "panoptic.json")
    shutil.copytree(files["pred_folder"], saved / "panoptic")
    gt = ["--gt-json", str(files["gt_json"]), "--gt-folder", str(files["gt_folder"])]
    done = _eval(*gt, "--pred-dir", str(saved), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == pq_from_files(*files.values())


@pytest.mark.parametrize("extra", [["--pred-dir", "x", "--pred-json", "y"],
                                   ["--pred-json", "y"], []])
def test_predictions_named_twice_or_not_at_all_exit_2(files, extra):
    gt = ["--gt-json", str(files["gt_json"]), "--gt-folder", str(files["gt_folder"])]
    done = _eval(*gt, *extra)
    assert done.returncode == 2 and done.stdout == ""
    assert "--pred-dir" in done.stderr and "--pred-json" in done.stderr
