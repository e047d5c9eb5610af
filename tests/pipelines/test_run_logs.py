"""`kedro run` as a CI job or `dvc repro` sees it: output piped to a file. Plain unwrapped log
lines, no warnings, progress as log lines, the closing summary, live MLflow metrics with
readable tags, and TensorBoard events."""
from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

PARAMS = ("source.synthetic.num_images=14,source.synthetic.min_size=96,"
          "source.synthetic.max_size=128,training.batch_size=2,training.warmup_iters=2,"
          "training.val_max_images=2,training.preview_samples=2,training.max_iters=4,"
          "training.log_every=2,training.checkpoint_every=2,training.model.min_size=96,"
          "training.model.max_size=128,training.selection.every_epochs=1,"
          "training.selection.max_images=2,training.tensorboard=true,"
          "training.tensorboard_every=2,training.tensorboard_images=2,evaluation.batch_size=2,"
          "ingestion.val_fraction=0.3")
MULTI = re.MULTILINE
LONGEST_LINE = 600  # Kedro's "Running node: f([inputs]) -> [outputs]" lines are the longest


@pytest.fixture(scope="module")
def piped_run(tmp_path_factory):
    from kedro_fixtures import copy_project

    project = copy_project(tmp_path_factory.mktemp("logs"))
    kedro = str(Path(sys.executable).with_name("kedro"))
    env = {**os.environ, "INSTSEG_MLFLOW": "on", "OMP_NUM_THREADS": "1"}
    env.pop("KEDRO_LOGGING_CONFIG", None)
    log = project / "run.log"
    with open(log, "w", encoding="utf-8") as out:
        done = subprocess.run(
            [kedro, "run", "--pipelines", "synthetic,ingestion,training,evaluation",
             "--params", PARAMS], cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, check=False, timeout=900)
    text = log.read_text(encoding="utf-8")
    assert done.returncode == 0, text[-4000:]
    return project, text


def test_log_lines_are_plain_unwrapped_and_warning_free(piped_run):
    _, text = piped_run
    lines = text.splitlines()
    assert "\r" not in text and "\x1b[" not in text
    assert max(len(line) for line in lines) <= LONGEST_LINE
    assert not [line for line in lines if "WARNING" in line or "Warning:" in line]
    assert "creating index" not in text and "index created" not in text
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO    kedro\.", text, MULTI)


def test_progress_is_reported_as_log_lines(piped_run):
    _, text = piped_run
    for step in (2, 4):
        assert re.search(rf"iter {step}/4 epoch \d+ loss [\d.]+ .* lr [\d.e-]+ [\d.]+ img/s "
                         r"[\d.]+ it/s ETA \d+:\d\d:\d\d$", text, MULTI), step
    assert re.search(r"predict: (\d+)/\1 img \(100%\) [\d.]+ img/s, ETA 0:00:00$", text, MULTI)


def test_summary_mlflow_run_and_tensorboard(piped_run):
    project, text = piped_run
    summary = text[text.rindex("run summary"):]
    assert re.search(r"metrics: mask AP [\d.]+ \(AP50 [\d.]+\) \| box AP .* \| PQ [\d.]+ "
                     r"SQ [\d.]+ RQ [\d.]+", summary)
    model_path = re.search(r"model: (data/06_models/synthetic/model\.pt/[^/]+/model\.pt)$",
                           summary, MULTI).group(1)
    assert (project / model_path).is_file()
    assert re.search(r"reports \(\d+\): data/08_reporting/synthetic/<name>/[^/]+/<name> for\n"
                     r"    [\s\S]*coco_metrics\.json", summary)
    run_id = re.search(r"MLflow run: ([0-9a-f]{32})$", summary, MULTI).group(1)

    with sqlite3.connect(project / "mlflow.db") as db:
        assert db.execute("select run_uuid from runs").fetchall() == [(run_id,)]
        tags = dict(db.execute("select key, value from tags where run_uuid = ?", (run_id,)))
        stamps = dict(db.execute("select key, count(*) || ' ' || (max(timestamp) - "
                                 "min(timestamp)) from metrics group by key"))
    assert tags["runner"] == "SequentialRunner" and tags["training_run_id"] == run_id
    assert tags["model_path"].endswith(model_path)
    assert tags["model_sha256"] == hashlib.sha256((project / model_path).read_bytes()).hexdigest()
    count, spread = map(int, stamps["train/loss"].split())
    assert count == 4 and spread > 0  # logged as the steps went, not at one instant
    assert {"val/segm_mAP", "train/images_per_s", "pq/all", "sq/all", "rq/all"} <= set(stamps)

    from tensorboard.backend.event_processing import event_accumulator as ea

    events = ea.EventAccumulator(str(project / "data/09_tracking/tensorboard" / run_id),
                                 size_guidance={ea.SCALARS: 0, ea.IMAGES: 0})
    events.Reload()
    assert {"train/loss", "train/lr", "val/loss", "val/segm_mAP"} <= set(
        events.Tags()["scalars"])
    assert len(events.Tags()["images"]) == 2
    assert all([e.step for e in events.Images(tag)] == [2, 4] for tag in events.Tags()["images"])
