"""The end-of-run summary, readable MLflow tags, model identity tags and quiet imports."""
from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
from types import SimpleNamespace

from instseg_pipeline.kedro_ext import tracking
from instseg_pipeline.kedro_ext.hooks import runner_name
from instseg_pipeline.kedro_ext.summary import RunSummaryHook, metric_parts, summary_lines

VERSION = "2026-01-02T03.04.05.678Z"


def _versioned(folder: str, name: str) -> str:
    return f"{folder}/{name}/{VERSION}/{name}"


def test_summary_names_metrics_models_reports_and_the_run():
    outputs = {"coco_metrics": {"segm": {"mAP": 0.5, "mAP_50": 0.75},
                                "bbox": {"mAP": 0.25, "mAP_50": -1.0}},
               "pq_metrics": {"all": {"pq": 0.3, "sq": 0.6, "rq": 0.5}},
               "cityscapes_metrics": {"AP": 0.1, "AP50": 0.2}}
    paths = {"model": _versioned("data/06_models/ci", "model.pt"),
             "predictions": _versioned("data/07_model_output/ci", "predictions.parquet"),
             "coco_metrics": _versioned("data/08_reporting/ci", "coco_metrics.json"),
             "pq_metrics": _versioned("data/08_reporting/ci", "pq_metrics.json"),
             "images": "data/03_primary/ci/images.parquet"}
    lines = summary_lines(outputs, paths, "abc123")
    assert lines == [
        ("metrics: mask AP 0.5000 (AP50 0.7500) | box AP 0.2500 (AP50 n/a) | "
        "PQ 0.3000 SQ 0.6000 RQ 0.5000 | cityscapes AP 0.1000 (AP50 0.2000)"),
        f"model: data/06_models/ci/model.pt/{VERSION}/model.pt",
        f"predictions: data/07_model_output/ci/predictions.parquet/{VERSION}/predictions.parquet",
        (f"reports (2): data/08_reporting/ci/<name>/{VERSION}/<name> for\n"
         "    coco_metrics.json, pq_metrics.json"),
        "MLflow run: abc123"]
    assert summary_lines({}, {}, None) == ["MLflow run: none (tracking off)"]
    assert metric_parts({"pq_metrics": {}}) == []
    assert metric_parts({"coco_metrics": {"pixel": {"pixel_accuracy": 0.9, "other": 1.0}}}) == [
        "pixel accuracy 0.9000"]


def test_many_reports_wrap_under_a_hundred_columns():
    names = [f"report_number_{k}.json" for k in range(30)]
    paths = {n: _versioned("data/08_reporting/ci", n) for n in names}
    lines = "\n".join(summary_lines({}, paths, "r")).splitlines()
    assert max(len(line) for line in lines) <= 100
    listed = [n.strip() for line in lines[1:-1] for n in line.split(",") if n.strip()]
    assert listed == sorted(names)


def test_summary_hook_collects_a_run(caplog):
    class Catalog:
        def get(self, name):
            version = SimpleNamespace(save=VERSION)
            return {"model": SimpleNamespace(_filepath="data/06_models/x/model.pt",
                                             _version=version),
                    "coco_metrics": SimpleNamespace(_filepath="data/08_reporting/x/c.json",
                                                    _version=None)}.get(name)

    hook = RunSummaryHook()
    hook.before_pipeline_run()
    hook.after_node_run(outputs={"coco_metrics": {"segm": {"mAP": 0.5, "mAP_50": 0.5}}})
    for name in ("model", "coco_metrics", "params:unused"):
        hook.after_dataset_saved(name)
    caplog.set_level(logging.INFO, logger="instseg_pipeline.kedro_ext.summary")
    hook.after_pipeline_run(catalog=Catalog())
    text = caplog.records[-1].getMessage()
    assert text.startswith("run summary\n  metrics: mask AP 0.5000")
    assert f"\n  model: data/06_models/x/model.pt/{VERSION}/model.pt\n" in text
    assert "reports (1):\n    data/08_reporting/x/c.json\n" in text
    assert text.endswith("MLflow run: none (tracking off)")


def test_runner_tag_is_the_class_name():
    class SequentialRunner:
        pass

    repr_ = "<kedro.runner.sequential_runner.SequentialRunner object at 0x7f98eae75950>"
    assert runner_name(repr_) == "SequentialRunner"
    assert runner_name(SequentialRunner()) == "SequentialRunner"
    assert runner_name(SequentialRunner) == "SequentialRunner"
    assert runner_name("ParallelRunner") == "ParallelRunner"


def test_model_identity_tags(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"weights" * 1000)
    tags = tracking.model_identity(str(path), VERSION, {"mlflow_run_id": "run9"})
    assert tags == {"model_version": VERSION, "model_path": str(path), "training_run_id": "run9",
                    "model_sha256": hashlib.sha256(b"weights" * 1000).hexdigest()}
    assert tracking.model_identity(None, None, {}) == {}


def test_pickle_warning_is_dropped_only_around_the_model_logging(caplog):
    target = logging.getLogger("mlflow.pytorch")
    with tracking._dropped_log_message("mlflow.pytorch", tracking._PICKLE_WARNING):
        target.warning("%s requires exercising caution", tracking._PICKLE_WARNING)
        target.warning("another warning")
    target.warning("%s after", tracking._PICKLE_WARNING)
    assert [r.getMessage() for r in caplog.records] == [
        "another warning", f"{tracking._PICKLE_WARNING} after"]


def test_kedro_mlflow_imports_without_its_type_hint_warning():
    code = ("import warnings; warnings.simplefilter('always'); "
            "from instseg_pipeline.kedro_ext.tracking import import_kedro_mlflow_quietly; "
            "import_kedro_mlflow_quietly(); import sys; "
            "assert 'kedro_mlflow.mlflow' in sys.modules; "
            "warnings.warn('still shown', UserWarning)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Add type hints" not in done.stderr + done.stdout
    assert "still shown" in done.stderr
