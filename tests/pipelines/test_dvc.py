"""DVC over the Kedro project, on a copy of the working tree committed to a temporary git
repository (as a fresh clone holds it): dvc.yaml's stages for the default configuration
and the CI one; `make run` leaving the default stages up to date in dvc.lock; metrics,
plots and params after that run; an experiment with a set parameter; raw data tracked with
`dvc add` surviving a push / delete / pull round trip; and the project's own dvc.lock
recording the CI stages as the working tree has them.

The run is the default configuration at tiny sizes (the copy's conf/base edited): one
`make run`, then one experiment that reruns training and evaluation.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from kedro_fixtures import TINY

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
VENV = BIN.parent
PIPELINES = ["synthetic", "ingestion", "training", "evaluation", "export"]
DEFAULT_STAGES = [f"{name}@default" for name in PIPELINES]
CI_STAGES = [f"{name}@ci" for name in PIPELINES]
REFRESH_LOCK = "dvc repro --glob '*@ci'"
REPORTS = "data/08_reporting/synthetic"
# tiny default configuration; a box score threshold of 0 so that the 4-iteration model
# detects something and the export has an image to trace
TINY_RUN = {**TINY,
            "training": {**TINY["training"], "threads": 1,
                         "model": {**TINY["training"]["model"], "box_score_thresh": 0.0}},
            "export": {"latency": {"warmup": 1, "repeats": 2}}}


def _env() -> dict:
    return {**os.environ, "INSTSEG_MLFLOW": "off", "DVC_NO_ANALYTICS": "1",
            "OMP_NUM_THREADS": "1", "COLUMNS": "200",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def _run(cwd: Path, *command: str) -> str:
    result = subprocess.run(list(command), cwd=cwd, env=_env(), capture_output=True,
                            text=True, timeout=900, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{output[-4000:]}"
    return output


def _dvc(cwd: Path, *args: str) -> str:
    return _run(cwd, str(BIN / "dvc"), *args)


def _dvc_json(cwd: Path, *args: str):
    result = subprocess.run([str(BIN / "dvc"), *args, "--json"], cwd=cwd, env=_env(),
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, f"dvc {' '.join(args)} --json failed:\n{result.stderr}"
    return json.loads(result.stdout)


def _git(cwd: Path, *args: str) -> str:
    return _run(cwd, "git", "-c", "user.name=test", "-c", "user.email=test@example.com",
                "-c", "commit.gpgsign=false", *args)


def _ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([a-z_]+@[a-z]+)'", output)


def _merge(into: dict, values: dict) -> None:
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _copy_working_tree(target: Path) -> None:
    """The files git would commit here (tracked and untracked, not ignored)."""
    listed = subprocess.run(["git", "ls-files", "-z", "-c", "-o", "--exclude-standard"],
                            cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = REPO / name
        if source.is_file():  # listed but deleted in the working tree: skip
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The working tree in a new git repository, conf/base at tiny sizes, committed."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    root = tmp_path_factory.mktemp("dvc") / "project"
    _copy_working_tree(root)
    for block, values in TINY_RUN.items():
        path = root / f"conf/base/parameters_{block}.yml"
        params = yaml.safe_load(path.read_text())
        _merge(params[block], values)
        path.write_text(yaml.safe_dump(params, sort_keys=False))
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "project at tiny sizes")
    return root


@pytest.fixture(scope="module")
def ran(project) -> str:
    """`make run` in the copy, with this environment (`-o install`: nothing installed)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    return _run(project, "make", "-o", "install", "run", f"VENV={VENV}")


def test_the_stages_cover_the_default_and_the_ci_configuration(project):
    from test_dvc_deps import read_stages

    listed = _dvc(project, "stage", "list", "--name-only").split()
    assert sorted(listed) == sorted(DEFAULT_STAGES + CI_STAGES)
    assert sorted(read_stages(project)) == sorted(listed)  # the deps test reads the same

    dry = _dvc(project, "repro", "--dry", "synthetic@default", "synthetic@ci")
    assert "> kedro run --env local --pipelines synthetic" in dry
    assert "> kedro run --env ci --pipelines synthetic" in dry
    assert not (project / "data/01_raw/synthetic").exists()  # a dry run runs nothing


def test_dvc_lock_records_the_ci_stages_as_the_working_tree_has_them():
    """The committed dvc.lock names the code and parameters the CI stages last ran with.

    Outputs and the data deps they feed are not compared: a fresh clone has none.
    """
    if not (REPO / ".git").exists() or not (REPO / "dvc.lock").exists():
        pytest.fail(f"no dvc.lock in {REPO}: run `{REFRESH_LOCK}` and commit dvc.lock")
    locked = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]
    missing = [stage for stage in CI_STAGES if stage not in locked]
    assert not missing, f"dvc.lock has no {missing}: run `{REFRESH_LOCK}`, commit dvc.lock"
    stale = {}
    for stage, changes in _dvc_json(REPO, "status", *CI_STAGES).items():
        for change in changes:  # "changed command", {"changed deps": ...}, {"changed outs"...}
            if change == "changed command":
                stale.setdefault(stage, []).append("cmd")
            if not isinstance(change, dict):
                continue
            deps = change.get("changed deps", {})
            stale_deps = [path for path in deps if path.startswith(("src/", "conf/"))]
            if stale_deps:
                stale.setdefault(stage, []).extend(stale_deps)
    assert not stale, (f"dvc.lock is out of date (changed since it was written: {stale}); "
                       f"run `{REFRESH_LOCK}` and commit dvc.lock")


@pytest.mark.slow
def test_make_run_leaves_the_default_stages_up_to_date(project, ran):
    assert _dvc_json(project, "status", *DEFAULT_STAGES) == {}
    dry = _dvc(project, "repro", "--dry", "--glob", "*@default")
    assert _ran(dry) == [], dry
    locked = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert set(DEFAULT_STAGES) <= set(locked)
    assert locked["training@default"]["cmd"] == "kedro run --env local --pipelines training"


@pytest.mark.slow
def test_metrics_and_plots_are_those_of_the_run(project, ran):
    shown = _dvc_json(project, "metrics", "show")[""]["data"]
    coco = shown[f"{REPORTS}/dvc/coco_metrics.json"]["data"]
    versions = sorted((project / f"{REPORTS}/coco_metrics.json").iterdir())
    saved = json.loads((versions[-1] / "coco_metrics.json").read_text())
    assert coco["segm"]["mAP"] == saved["segm"]["mAP"]
    assert coco["bbox"]["mAP_50"] == saved["bbox"]["mAP_50"]
    assert "per_class_ap" not in coco["segm"]
    assert set(shown[f"{REPORTS}/dvc/pq_metrics.json"]["data"]["all"]) == {"pq", "sq", "rq"}
    assert set(shown[f"{REPORTS}/dvc/cityscapes_metrics.json"]["data"]) == {"AP", "AP50"}
    assert "segm.mAP" in _dvc(project, "metrics", "show")

    plots = _dvc_json(project, "plots", "show")["data"]
    values = {Path(path).stem: plot[0]["content"]["data"]["values"]
              for path, plot in plots.items() if path.startswith(REPORTS)}
    assert set(values) == {"training_loss", "learning_rate", "pr_curve"}
    iters = TINY_RUN["training"]["max_iters"]
    assert [int(row["iteration"]) for row in values["training_loss"]] == list(range(iters))
    assert all(float(row["lr"]) > 0 for row in values["learning_rate"])
    recall = [float(row["recall"]) for row in values["pr_curve"]]
    assert recall == sorted(recall) and 0 < len(recall) <= 101
    assert all(0 <= float(row["precision"]) <= 1 for row in values["pr_curve"])
    rendered = project.parent / "plots"
    assert "index.html" in _dvc(project, "plots", "show", "-o", str(rendered))
    assert "Precision-recall at IoU 0.50" in (rendered / "index.html").read_text()


@pytest.mark.slow
def test_an_experiment_with_a_set_parameter_is_shown_and_diffed(project, ran):
    _git(project, "add", "-A")
    _git(project, "commit", "-q", "-m", "run recorded in dvc.lock")
    output = _dvc(project, "exp", "run", "-n", "iters6", "-S",
                  "conf/base/parameters_training.yml:training.max_iters=6",
                  "evaluation@default")
    assert _ran(output) == ["training@default", "evaluation@default"], output

    shown = _dvc_json(project, "exp", "show")
    baseline = next(row for row in shown if row.get("rev") != "workspace")
    experiment = next(exp["revs"][0] for exp in baseline["experiments"]
                      if exp["name"] == "iters6")
    params = experiment["data"]["params"]["conf/base/parameters_training.yml"]["data"]
    assert params["training"]["max_iters"] == 6
    base_params = baseline["data"]["params"]["conf/base/parameters_training.yml"]["data"]
    assert base_params["training"]["max_iters"] == TINY_RUN["training"]["max_iters"]
    assert "mAP" in experiment["data"]["metrics"][f"{REPORTS}/dvc/coco_metrics.json"][
        "data"]["segm"]

    diff = _dvc(project, "params", "diff")
    before = TINY_RUN["training"]["max_iters"]
    assert re.search(rf"training\.max_iters\s+{before}\s+6", diff), diff
    assert "segm.mAP" in _dvc(project, "metrics", "diff", "--all")
    loss = (project / f"{REPORTS}/dvc/training_loss.csv").read_text().splitlines()
    assert len(loss) == 1 + 6


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_raw_data_round_trip_through_a_local_remote(project, tmp_path):
    from coco_fixtures import make_coco

    raw = project / "data/01_raw/coco_small"
    make_coco(raw, n_images=4)
    before = _digest(raw)
    _dvc(project, "add", "data/01_raw/coco_small")
    assert (project / "data/01_raw/coco_small.dvc").exists()
    _dvc(project, "remote", "add", "-f", "-d", "local", str(tmp_path / "remote"))
    _dvc(project, "push", "data/01_raw/coco_small.dvc")
    shutil.rmtree(raw)
    shutil.rmtree(project / ".dvc/cache")
    _dvc(project, "pull", "data/01_raw/coco_small.dvc")
    assert _digest(raw) == before
