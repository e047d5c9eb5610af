"""The notebooks run headless (nbclient) against a tiny project run, from the project's
notebooks/ folder as a user opens them, and are stored without outputs.

The tiny model finds nothing, so after the tracked run (ingestion, training, evaluation)
the evaluation is run once more, untracked, on predictions made from the ground truth with
known errors (`_predictions_with_known_errors`). That gives the error analysis something to
find and model_comparison two versions of coco_metrics next to one MLflow run. A probe cell
appended to each executed copy reports what the notebook computed.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from kedro_fixtures import TINY, copy_project
from nbclient import NotebookClient
from scipy.ndimage import binary_dilation

from instseg_pipeline.data.masks import (
    bitmap_to_rle,
    decode_strings,
    rle_area,
    rle_bbox,
    rle_to_string,
)
from instseg_pipeline.data.tables import label_mapping

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO_ROOT / "notebooks"
EXPECTED = {"data_analysis.ipynb", "model_comparison.ipynb", "error_analysis.ipynb"}
KERNEL = "instseg-pipeline-test"
PROBES = {
    "data_analysis.ipynb": '{"images": int(splits.loc["total", "images"]), '
                           '"per_class": int(per_class["total"].sum()), "shown": len(sample)}',
    "model_comparison.ipynb": '{"runs": len(table), "versions": list(by_version.index), '
                              '"segm": by_version["segm/mAP"].tolist()}',
    "error_analysis.ipynb": '{"fp": fp_table["prediction_id"].tolist(), '
                            '"fn": fn_table["instance_id"].tolist(), '
                            '"wrong_class": int(per_image["wrong_class"].sum()), '
                            '"ranked": [int(i) for i in ranked.index]}',
}


def _prediction(mask: np.ndarray, image_id: int, category_id: int, labels: dict,
                score: float) -> dict:
    rle = bitmap_to_rle(mask)
    return {"image_id": image_id, "category_id": category_id, "label": labels[category_id],
            "score": score, "bbox": rle_bbox(rle), "area": rle_area(rle),
            "rle": rle_to_string(rle), "height": mask.shape[0], "width": mask.shape[1]}


def _predictions_with_known_errors(images: pd.DataFrame, instances: pd.DataFrame,
                                   categories: pd.DataFrame, split: str
                                   ) -> tuple[pd.DataFrame, dict]:
    """Predictions of the split's non-crowd GT (largest first) with known errors.

    Largest: exact (IoU 1) plus a dilated copy scored 0.6, the false positive. Second:
    dilated and of another class (a confusion, IoU < 1), plus a copy scored 0.2 (below the
    matching threshold, ignored). Smallest: not predicted, the false negative. Others: exact.
    """
    shown = images[images["split"] == split].set_index("image_id")
    gt = instances[instances["image_id"].isin(shown.index)
                   & ~instances["iscrowd"].astype(bool)]
    gt = gt.sort_values(["area", "instance_id"], ascending=[False, True])
    assert len(gt) >= 3, f"the tiny {split} split has {len(gt)} instances; 3 are needed"
    labels = label_mapping(categories)
    ids = sorted(labels)
    other = {c: ids[(i + 1) % len(ids)] for i, c in enumerate(ids)}
    rows = []
    for rank, item in enumerate(gt.itertuples(index=False)):
        size = shown.loc[item.image_id]
        mask = decode_strings([item.rle], int(size["height"]), int(size["width"]))[0]
        loose = binary_dilation(mask).astype(np.uint8)
        if rank == 0:
            rows += [_prediction(mask, item.image_id, item.category_id, labels, 0.9),
                     _prediction(loose, item.image_id, item.category_id, labels, 0.6)]
        elif rank == 1:
            rows += [_prediction(loose, item.image_id, other[item.category_id], labels, 0.8),
                     _prediction(mask, item.image_id, item.category_id, labels, 0.2)]
        elif rank < len(gt) - 1:
            rows.append(_prediction(mask, item.image_id, item.category_id, labels, 0.7))
    frame = pd.DataFrame(rows)
    frame.insert(0, "prediction_id", np.arange(1, len(frame) + 1, dtype=np.int64))
    known = {"fp": [2], "fn": [int(gt["instance_id"].iloc[-1])], "wrong_class": 1}
    return frame, known


def _evaluate_known_errors(project: Path) -> dict:
    bootstrap_project(project)
    with KedroSession.create(project_path=project, runtime_params=TINY) as session:
        catalog = session.load_context().catalog
        split = catalog.load("params:evaluation")["split"]
        frame, known = _predictions_with_known_errors(
            catalog.load("images"), catalog.load("instances"), catalog.load("categories"),
            split)
        catalog.save("predictions", frame)
    with KedroSession.create(project_path=project, runtime_params=TINY) as session:
        session.run(pipeline_names=["evaluation"], from_inputs=["predictions"])
        known["segm_map"] = session.load_context().catalog.load("coco_metrics")["segm"]["mAP"]
    return known


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict:
    """A throwaway project after one tracked tiny run and one untracked evaluation of
    predictions with known errors; ``known`` holds what the notebooks must find."""
    project = copy_project(tmp_path_factory.mktemp("notebooks"))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(project)
        patch.delenv("INSTSEG_MLFLOW", raising=False)
        bootstrap_project(project)
        with KedroSession.create(project_path=project, runtime_params=TINY) as session:
            session.run(pipeline_names=["ingestion", "training", "evaluation"])
        patch.setenv("INSTSEG_MLFLOW", "off")
        known = _evaluate_known_errors(project)
    shutil.copytree(NOTEBOOKS, project / "notebooks")
    return {"path": project, "known": known}


@pytest.fixture(scope="module")
def kernel(tmp_path_factory) -> str:
    """A kernelspec for this interpreter in a temporary Jupyter path, so nothing needs
    registering on the machine (a fresh `pip install -e .[test]` is enough)."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "instseg-pipeline (tests)", "language": "python"}))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JUPYTER_PATH", str(root))
        yield KERNEL


def _execute(project: Path, name: str, kernel: str) -> dict:
    """Run a copy of the notebook in notebooks/ (cell errors raise CellExecutionError with
    the cell's source); returns the probe's JSON."""
    folder = project / "notebooks"
    notebook = nbformat.read(folder / name, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(
        f"import json as _json\nprint(_json.dumps({PROBES[name]}))"))
    NotebookClient(notebook, kernel_name=kernel, timeout=600, startup_timeout=180,
                   resources={"metadata": {"path": str(folder)}}).execute()
    stream = [o for o in notebook.cells[-1].outputs if o.get("name") == "stdout"]
    return json.loads(stream[-1]["text"].strip().splitlines()[-1])


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stored_notebooks_have_no_outputs_and_match_their_generator(tmp_path):
    stored = {p.name: p for p in NOTEBOOKS.glob("*.ipynb")}
    assert set(stored) == EXPECTED
    for name, path in stored.items():
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        assert notebook.cells[0].cell_type == "markdown", name
        assert notebook.cells[1].source == "%load_ext kedro.ipython", name
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, (name, cell.id)
    _load_script("make_notebooks").write_notebooks(tmp_path)
    for name, path in stored.items():
        assert (tmp_path / name).read_bytes() == path.read_bytes(), \
            f"{name} differs from scripts/make_notebooks.py: run the script"


def test_data_analysis_counts_the_tables(project, kernel):
    probe = _execute(project["path"], "data_analysis.ipynb", kernel)
    images = pd.read_parquet(project["path"] / "data/03_primary/synthetic/images.parquet")
    instances = pd.read_parquet(project["path"] / "data/03_primary/synthetic/instances.parquet")
    assert probe["images"] == len(images) == TINY["source"]["synthetic"]["num_images"]
    assert probe["per_class"] == int((~instances["iscrowd"].astype(bool)).sum())
    assert probe["shown"] == 6


def test_model_comparison_lists_one_run_and_both_metric_versions(project, kernel):
    probe = _execute(project["path"], "model_comparison.ipynb", kernel)
    folder = project["path"] / "data/08_reporting/synthetic/coco_metrics.json"
    assert probe["runs"] == 1  # the known-errors evaluation ran untracked
    assert probe["versions"] == sorted(p.name for p in folder.iterdir())
    assert len(probe["versions"]) == 2
    assert probe["segm"][-1] == pytest.approx(project["known"]["segm_map"])
    assert probe["segm"][-1] > 0  # the known-errors version, not the tiny model's


def test_error_analysis_finds_the_known_errors(project, kernel):
    probe = _execute(project["path"], "error_analysis.ipynb", kernel)
    known = project["known"]
    assert probe["fp"] == known["fp"]
    assert probe["fn"] == known["fn"]
    assert probe["wrong_class"] == known["wrong_class"]
    assert probe["ranked"], "no image was ranked"
