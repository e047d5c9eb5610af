"""The notebooks: jupytext pairs, executed headless against a tiny project run, and served
by `kedro jupyter lab`.

Each notebook in notebooks/ is a pair (notebooks/jupytext.toml): a percent script
`<name>.py` and the `<name>.ipynb` Jupyter opens, stored without outputs. The slow tests
run each notebook as read from its script (`jupytext.read`) with nbclient, from the
project's notebooks/ folder as a user opens them.

The tiny model finds nothing, so after the tracked run (ingestion, training, evaluation)
the evaluation is run once more, untracked, on predictions made from the ground truth with
known errors (`_predictions_with_known_errors`). That gives the error analysis something to
find and model_comparison two versions of coco_metrics next to one MLflow run. A probe cell
appended to each executed copy reports what the notebook computed.
"""
from __future__ import annotations

import ast
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import jupytext
import nbformat
import numpy as np
import pandas as pd
import pytest
from jupyter_client import BlockingKernelClient
from jupytext.config import find_jupytext_configuration_file, load_jupytext_configuration_file
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from kedro_fixtures import TINY, copy_project
from matplotlib.figure import Figure
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

REPO_ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO_ROOT / "notebooks"
EXPECTED = {"data_analysis", "model_comparison", "error_analysis"}
PAIRING = "ipynb,py:percent"
KERNEL = "instseg-pipeline-test"
KEDRO_KERNEL = "kedro_instseg_pipeline"  # what `kedro jupyter` registers for this package
SERVER_TIMEOUT = 120  # seconds; an idle machine needs well under 30 for server and kernel
PROBES = {
    "data_analysis": '{"images": int(splits.loc["total", "images"]), '
                     '"per_class": int(per_class["total"].sum()), "shown": len(sample)}',
    "model_comparison": '{"runs": len(table), "versions": list(by_version.index), '
                        '"segm": by_version["segm/mAP"].tolist(), "comparison": None '
                        'if comparison is None else comparison["model"].tolist()}',
    "error_analysis": '{"fp": fp_table["prediction_id"].tolist(), '
                      '"fn": fn_table["instance_id"].tolist(), '
                      '"wrong_class": int(per_image["wrong_class"].sum()), '
                      '"ranked": [int(i) for i in ranked.index]}',
}
# What the model_comparison pipeline writes, made by hand: distinct values to find on screen.
COMPARISON = pd.DataFrame({
    "model": ["maskrcnn_tiny", "yolact_r18"], "backbone": ["gn-tiny", "resnet18"],
    "mAP": [0.1234, 0.2468], "mAP_50": [0.3012, 0.4024], "mAP_75": [0.0871, 0.1902],
    "box_mAP": [0.1567, 0.2789], "fps": [41.5, 23.25], "fps_onnx": [63.75, 37.5],
    "params": [1_203_456, 11_765_432], "train_seconds": [12.5, 48.75]})


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


def _save_model_comparison(project: Path) -> None:
    """Save COMPARISON and a plot of it through the project's catalog
    (conf/base/catalog_model_comparison.yml)."""
    bootstrap_project(project)
    with KedroSession.create(project_path=project, runtime_params=TINY) as session:
        catalog = session.load_context().catalog
        catalog.save("model_comparison", COMPARISON)
        figure = Figure(figsize=(4, 3))
        figure.add_subplot().scatter(COMPARISON["fps"], COMPARISON["mAP"])
        catalog.save("model_comparison_plot", figure)


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


def _execute(project: Path, name: str, kernel: str) -> tuple[dict, nbformat.NotebookNode]:
    """Run the notebook built from ``notebooks/<name>.py`` in notebooks/ (cell errors raise
    CellExecutionError with the cell's source); returns the probe's JSON and the executed
    notebook."""
    folder = project / "notebooks"
    notebook = jupytext.read(folder / f"{name}.py")
    notebook.cells.append(nbformat.v4.new_code_cell(
        f"import json as _json\nprint(_json.dumps({PROBES[name]}))"))
    NotebookClient(notebook, kernel_name=kernel, timeout=600, startup_timeout=180,
                   resources={"metadata": {"path": str(folder)}}).execute()
    stream = [o for o in notebook.cells[-1].outputs if o.get("name") == "stdout"]
    return json.loads(stream[-1]["text"].strip().splitlines()[-1]), notebook


def _displayed(notebook: nbformat.NotebookNode, mime: str) -> list[str]:
    """Every ``mime`` output of the executed notebook, as text."""
    return ["".join(output["data"][mime]) for cell in notebook.cells
            if cell.cell_type == "code" for output in cell.outputs
            if mime in output.get("data", {})]


def _cells(notebook: nbformat.NotebookNode) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source) for cell in notebook.cells]


def test_notebooks_are_paired_scripts_stored_without_outputs():
    config = load_jupytext_configuration_file(find_jupytext_configuration_file(str(NOTEBOOKS)))
    assert config.default_formats(str(NOTEBOOKS / "any.ipynb")) == PAIRING
    assert {p.stem for p in NOTEBOOKS.glob("*.ipynb")} == EXPECTED
    assert {p.stem for p in NOTEBOOKS.glob("*.py")} == EXPECTED
    for name in sorted(EXPECTED):
        stored = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        nbformat.validate(stored)
        script = jupytext.read(NOTEBOOKS / f"{name}.py")
        assert _cells(stored) == _cells(script), \
            f"notebooks/{name}.ipynb and {name}.py differ: run `jupytext --sync notebooks/*.py`"
        assert stored.metadata["jupytext"]["formats"] == PAIRING, name
        assert stored.cells[0].cell_type == "markdown", name
        assert stored.cells[1].source == "%load_ext kedro.ipython", name
        for cell in stored.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, \
                    f"notebooks/{name}.ipynb stores outputs: clear them (cell {cell.id})"


@pytest.mark.slow
def test_data_analysis_counts_the_tables(project, kernel):
    probe, _ = _execute(project["path"], "data_analysis", kernel)
    images = pd.read_parquet(project["path"] / "data/03_primary/synthetic/images.parquet")
    instances = pd.read_parquet(project["path"] / "data/03_primary/synthetic/instances.parquet")
    assert probe["images"] == len(images) == TINY["source"]["synthetic"]["num_images"]
    assert probe["per_class"] == int((~instances["iscrowd"].astype(bool)).sum())
    assert probe["shown"] == 6


@pytest.mark.slow
def test_model_comparison_lists_one_run_and_both_metric_versions(project, kernel):
    """Before any model_comparison run: the runs, the metric versions, and a line saying
    the comparison table has no saved version."""
    probe, notebook = _execute(project["path"], "model_comparison", kernel)
    folder = project["path"] / "data/08_reporting/synthetic/coco_metrics.json"
    assert probe["runs"] == 1  # the known-errors evaluation ran untracked
    assert probe["versions"] == sorted(p.name for p in folder.iterdir())
    assert len(probe["versions"]) == 2
    assert probe["segm"][-1] == pytest.approx(project["known"]["segm_map"])
    assert probe["segm"][-1] > 0  # the known-errors version, not the tiny model's
    assert probe["comparison"] is None
    lines = _displayed(notebook, "text/markdown")
    assert any(line.startswith("`model_comparison` has no saved version") for line in lines)
    assert any(line.startswith("`model_comparison_plot` has no saved version")
               for line in lines)


@pytest.mark.slow
def test_model_comparison_shows_the_saved_comparison_table_and_plot(project, kernel):
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(project["path"])
        patch.setenv("INSTSEG_MLFLOW", "off")
        _save_model_comparison(project["path"])
    probe, notebook = _execute(project["path"], "model_comparison", kernel)
    assert probe["comparison"] == COMPARISON["model"].tolist()
    tables = [html for html in _displayed(notebook, "text/html")
              if all(f"<td>{model}</td>" in html for model in COMPARISON["model"])]
    assert len(tables) == 1, "the comparison table was not displayed"
    headers = [tables[0].index(f"<th>{column}</th>") for column in COMPARISON.columns]
    assert headers == sorted(headers), "columns not in the documented order"
    for value in ("0.2468", "11765432", "48.75"):
        assert value in tables[0]
    assert len(_displayed(notebook, "image/png")) >= 1  # the saved plot (coco plots too)
    assert not any("model_comparison" in line for line in _displayed(notebook, "text/markdown"))


@pytest.mark.slow
def test_error_analysis_finds_the_known_errors(project, kernel):
    probe, _ = _execute(project["path"], "error_analysis", kernel)
    known = project["known"]
    assert probe["fp"] == known["fp"]
    assert probe["fn"] == known["fn"]
    assert probe["wrong_class"] == known["wrong_class"]
    assert probe["ranked"], "no image was ranked"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get(base: str, path: str, token: str, method: str = "GET") -> dict:
    request = urllib.request.Request(f"{base}{path}?token={token}", method=method,
                                     data=b"{}" if method == "POST" else None)
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _wait_for_server(base: str, token: str, server: subprocess.Popen, log: Path) -> dict:
    """The server's kernelspecs, once it answers on its port."""
    deadline = time.monotonic() + SERVER_TIMEOUT
    while True:
        try:
            return _get(base, "/api/kernelspecs", token)
        except OSError:
            assert server.poll() is None, f"kedro jupyter lab exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no answer on {base}:\n{log.read_text()}"
            time.sleep(0.5)


def _evaluate_in_kernel(connection_file: Path, expressions: dict[str, str]) -> dict:
    """``expressions`` evaluated in a running kernel, as the reprs of their values.

    User expressions come back in the execute reply, so nothing depends on catching the
    kernel's output stream while it is still starting."""
    client = BlockingKernelClient(connection_file=str(connection_file))
    client.load_connection_file()
    client.start_channels(hb=False)
    try:
        msg_id = client.execute("", silent=True, user_expressions=expressions)
        while (reply := client.get_shell_msg(timeout=SERVER_TIMEOUT))[
                "parent_header"].get("msg_id") != msg_id:
            pass
    finally:
        client.stop_channels()
    values = reply["content"]["user_expressions"]
    assert all(v["status"] == "ok" for v in values.values()), values
    return {name: ast.literal_eval(v["data"]["text/plain"]) for name, v in values.items()}


@pytest.mark.slow
def test_kedro_jupyter_lab_serves_the_project_with_the_kedro_kernel(tmp_path):
    project = copy_project(tmp_path)
    shutil.copytree(NOTEBOOKS, project / "notebooks")
    jupyter = tmp_path / "jupyter"  # kernelspec, runtime files: nothing under ~
    env = dict(os.environ, JUPYTER_DATA_DIR=str(jupyter / "data"),
               JUPYTER_CONFIG_DIR=str(jupyter / "config"),
               JUPYTER_RUNTIME_DIR=str(jupyter / "runtime"), IPYTHONDIR=str(jupyter / "ipython"))
    port, token, log = _free_port(), "notebooks-test", tmp_path / "jupyter_lab.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "kedro", "jupyter", "lab", "--no-browser", f"--port={port}",
             "--ServerApp.port_retries=0", "--ServerApp.ip=127.0.0.1",
             "--ServerApp.allow_root=True",  # CI containers run as root
             f"--IdentityProvider.token={token}"],
            cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        specs = _wait_for_server(base, token, server, log)
        assert specs["default"] == KEDRO_KERNEL
        assert "kedro.ipython" in specs["kernelspecs"][KEDRO_KERNEL]["spec"]["argv"]
        # jupytext's contents manager opens the percent script as a notebook
        script = _get(base, "/api/contents/notebooks/model_comparison.py", token)
        assert script["type"] == "notebook" and script["content"]["cells"]
        kernel = _get(base, "/api/kernels", token, method="POST")
        assert kernel["name"] == KEDRO_KERNEL
        values = _evaluate_in_kernel(jupyter / "runtime" / f"kernel-{kernel['id']}.json",
                                     {"catalog": "'coco_metrics' in catalog",
                                      "project": "str(context.project_path)",
                                      "session": "type(session).__name__"})
        assert values["catalog"] is True
        assert Path(values["project"]).resolve() == project.resolve()
        assert values["session"] == "KedroSession"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
