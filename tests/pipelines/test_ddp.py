"""DDP through `kedro run` with the default model (maskrcnn_tiny), as users start it: two
gloo workers on one machine, two "nodes" (one process each) on one machine, and a worker
killed mid-run followed by ``resume: auto``; which node tracks in MLflow.

The Kedro runs share one ingestion (a module fixture); each test trains in its own copy of
the project, so every run has its own checkpoints, models and mlflow.db. Every subprocess
has a timeout: a hung rendezvous or collective fails the test instead of the suite.
"""
from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch
from kedro_fixtures import copy_project
from process_fixtures import free_port

from instseg_pipeline.kedro_ext.hooks import DistributedTrackingHook, tracking_node

KEDRO = str(Path(sys.executable).with_name("kedro"))
RUN_TIMEOUT = 420  # seconds for one `kedro run`; a DDP run here takes well under a minute

INGEST = ("source.synthetic.num_images=12,source.synthetic.min_size=96,"
          "source.synthetic.max_size=128")
# batch 1 per worker, tiny images, no selection evaluations before the end
TRAIN = ("training.batch_size=1,training.warmup_iters=2,training.log_every=2,"
         "training.val_max_images=2,training.preview_samples=2,training.progress_bar=false,"
         "training.model.min_size=96,training.model.max_size=128,"
         "training.selection.max_images=2,training.checkpoint_every=2")
CHECKPOINTS = "data/06_models/checkpoints/synthetic"
MODELS = "data/06_models/synthetic/model.pt"
HISTORY = "data/08_reporting/synthetic/training_history.parquet"


def kedro_command(pipeline: str, params: str) -> list[str]:
    return [KEDRO, "run", "--pipeline", pipeline, "--params", params]


def environment(tracking: bool) -> dict:
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("INSTSEG_MLFLOW", None)
    if not tracking:
        env["INSTSEG_MLFLOW"] = "off"
    return env


def run_kedro(project: Path, pipeline: str, params: str, tracking: bool = False
              ) -> subprocess.CompletedProcess:
    return subprocess.run(kedro_command(pipeline, params), cwd=project,
                          env=environment(tracking), capture_output=True, text=True,
                          check=False, timeout=RUN_TIMEOUT)


def output(result: subprocess.CompletedProcess) -> str:
    return result.stdout[-4000:] + result.stderr[-6000:]


def ddp_params(port: int, run_id: str, **distributed) -> str:
    """TRAIN plus the ``training.distributed`` keys given, on a loopback rendezvous."""
    keys = {"rdzv_endpoint": f"127.0.0.1:{port}", "run_id": run_id, **distributed}
    return TRAIN + "".join(f",training.distributed.{k}={v}" for k, v in keys.items())


@pytest.fixture(scope="module")
def ingested(tmp_path_factory) -> Path:
    """A project copy whose synthetic source is generated and ingested (once per module)."""
    project = copy_project(tmp_path_factory.mktemp("ddp_ingested"))
    result = run_kedro(project, "ingestion", INGEST)
    assert result.returncode == 0, output(result)
    return project


def project_with_tables(root: Path, ingested: Path) -> Path:
    """A fresh project copy holding the ingested data (raw images and tables), as a node
    of a multi-node run holds its own copy."""
    root.mkdir(parents=True, exist_ok=True)
    project = copy_project(root)
    shutil.copytree(ingested / "data", project / "data")
    return project


def only_version(project: Path, dataset: str) -> Path:
    """The single version a run wrote of a versioned dataset (its file)."""
    versions = sorted((project / dataset).iterdir())
    assert len(versions) == 1, versions
    return versions[0] / Path(dataset).name


def load_model(project: Path) -> dict:
    return torch.load(only_version(project, MODELS), map_location="cpu", weights_only=True)


def mlflow_runs(project: Path) -> list[tuple]:
    db = project / "mlflow.db"
    if not db.exists():
        return []
    with sqlite3.connect(db) as connection:
        return connection.execute("select run_uuid, status from runs").fetchall()


def metric_keys(project: Path, run_id: str) -> dict[str, int]:
    """{metric key: number of logged steps} of one MLflow run."""
    with sqlite3.connect(project / "mlflow.db") as connection:
        rows = connection.execute("select key, count(*) from metrics where run_uuid = ? "
                                  "group by key", (run_id,)).fetchall()
    return dict(rows)


# ---------------------------------------------------------------- fast: which node tracks

@pytest.mark.parametrize(("block", "tracks"), [
    (None, True), ({}, True), ({"nproc_per_node": 4}, True),
    ({"nnodes": 2, "node_rank": 0}, True), ({"nnodes": 2, "node_rank": 1}, False),
    ({"nnodes": 3, "node_rank": "2"}, False), ({"nnodes": "two"}, True),
])
def test_only_node_rank_zero_tracks(block, tracks):
    params = {"training": {"distributed": block}} if block is not None else {}
    assert tracking_node(params) is tracks


def test_the_hook_switches_kedro_mlflow_off_on_other_nodes():
    from types import SimpleNamespace

    from kedro_mlflow.config.kedro_mlflow_config import KedroMlflowConfig
    from kedro_mlflow.framework.hooks.utils import _assert_mlflow_enabled

    for node_rank, tracked in ((0, True), (1, False)):
        config = KedroMlflowConfig()
        params = {"training": {"distributed": {"nnodes": 2, "node_rank": node_rank}}}
        DistributedTrackingHook().after_context_created(
            SimpleNamespace(params=params, mlflow=config))
        for pipeline in ("training", "__default__", "ingestion"):
            assert _assert_mlflow_enabled([pipeline], config) is tracked, (node_rank, pipeline)


# ------------------------------------------------------------------- (a) two gloo workers

@pytest.mark.slow
def test_two_workers_write_one_model_and_one_mlflow_run(tmp_path, ingested):
    project = project_with_tables(tmp_path, ingested)
    params = ddp_params(free_port(), "two-workers", nproc_per_node=2) + \
        ",training.max_iters=4"
    result = run_kedro(project, "training", params, tracking=True)
    assert result.returncode == 0, output(result)
    log = result.stdout + result.stderr
    assert "training with DDP: 1 node(s) x 2 worker(s) = world size 2" in log
    assert re.search(r"\[rank 0\] INFO .*training on cpu .*world size 2", log)  # a worker

    model = load_model(project)  # one model version, rank 0's final weights
    assert model["iterations"] == 4 and model["config"]["name"] == "maskrcnn_tiny"
    final = torch.load(Path(project, CHECKPOINTS, "ckpt_00000004.pt"), weights_only=True)
    assert len(final["rng"]) == 2  # both ranks' RNG states: it was a 2-process run
    for name, value in final["model"].items():
        assert torch.equal(model["state_dict"][name], value), name

    runs = mlflow_runs(project)
    assert len(runs) == 1 and runs[0][1] == "FINISHED", runs  # none from the workers
    metrics = metric_keys(project, runs[0][0])
    assert metrics["train/loss"] == 4 and metrics["train/loss_mask"] == 4, metrics
    with sqlite3.connect(project / "mlflow.db") as connection:
        params_logged = dict(connection.execute("select key, value from params").fetchall())
    assert params_logged["training.distributed.nproc_per_node"] == "2"


# ------------------------------------------------------- (b) two nodes on one machine

@pytest.mark.slow
def test_two_nodes_one_process_each_finish_with_the_same_weights(tmp_path, ingested):
    """nnodes=2 x nproc_per_node=1, static rendezvous on 127.0.0.1: two `kedro run`s, each
    in its own project copy (its own disk); they train one model together (DDP), both
    save rank 0's result, and only node 0 tracks in MLflow."""
    nodes = [project_with_tables(tmp_path / f"node{rank}", ingested) for rank in (0, 1)]
    port = free_port()
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    processes = []
    for rank, (project, log) in enumerate(zip(nodes, logs, strict=True)):
        params = ddp_params(port, "two-nodes", nnodes=2, nproc_per_node=1, node_rank=rank,
                            rdzv_backend="static", timeout_s=120) + ",training.max_iters=4"
        with open(log, "w") as handle:
            processes.append(subprocess.Popen(kedro_command("training", params), cwd=project,
                                              env=environment(tracking=True), stdout=handle,
                                              stderr=subprocess.STDOUT, text=True))
    try:
        codes = [process.wait(timeout=RUN_TIMEOUT) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    texts = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n\n".join(text[-5000:] for text in texts)
    for text in texts:
        assert "training with DDP: 2 node(s) x 1 worker(s) = world size 2" in text

    models = [load_model(project) for project in nodes]
    assert models[0]["iterations"] == models[1]["iterations"] == 4
    assert models[0]["state_dict"].keys() == models[1]["state_dict"].keys()
    for name, value in models[0]["state_dict"].items():
        assert torch.equal(models[1]["state_dict"][name], value), name
    histories = [pd.read_parquet(only_version(project, HISTORY)) for project in nodes]
    pd.testing.assert_frame_equal(histories[0].drop(columns="time"),
                                  histories[1].drop(columns="time"))
    # one training: the checkpoint (rank 0 writes) holds both processes' RNG states
    saved = torch.load(Path(nodes[0], CHECKPOINTS, "ckpt_00000004.pt"), weights_only=True)
    assert len(saved["rng"]) == 2
    assert not list(Path(nodes[1], CHECKPOINTS).glob("*.pt"))  # rank 1 writes none
    assert len(mlflow_runs(nodes[0])) == 1 and mlflow_runs(nodes[1]) == []
    assert "MLflow tracking is off on this node" in texts[1]


# ------------------------------------------- (c) a worker killed mid-run, then resume: auto

def worker_processes(parent: psutil.Process) -> list[psutil.Process]:
    """The DDP workers started under `parent`: the launcher spawns them with
    multiprocessing's spawn (their LOCAL_RANK is set after start, so /proc does not show
    it; the failure message says which rank a killed pid was)."""
    found = []
    for child in parent.children(recursive=True):
        try:
            if any("spawn_main" in part for part in child.cmdline()):
                found.append(child)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@pytest.mark.slow
def test_a_killed_worker_fails_the_run_cleanly_and_resume_auto_finishes_it(tmp_path,
                                                                          ingested):
    project = project_with_tables(tmp_path, ingested)
    first_checkpoint = project / CHECKPOINTS / "ckpt_00000002.pt"
    params = ddp_params(free_port(), "killed", nproc_per_node=2, timeout_s=60) + \
        ",training.max_iters=8"
    log = tmp_path / "killed.log"
    with open(log, "w") as handle:
        process = subprocess.Popen(kedro_command("training", params + ",training.resume=none"),
                                   cwd=project, env=environment(tracking=False),
                                   stdout=handle, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not first_checkpoint.exists():
            assert process.poll() is None, log.read_text()[-5000:]
            assert time.monotonic() < deadline, "no checkpoint written in time"
            time.sleep(0.05)
        workers = worker_processes(psutil.Process(process.pid))
        assert len(workers) == 2, workers
        victim = workers[-1]
        victim.kill()  # SIGKILL: no handler, no error file, no goodbye to its peer
        killed_at = time.monotonic()
        code = process.wait(timeout=180)
        stopped_after = time.monotonic() - killed_at
    finally:
        if process.poll() is None:
            process.kill()
    text = log.read_text()
    print(f"killed pid {victim.pid}: kedro run exited with {code} "
          f"{stopped_after:.1f} s after the kill")
    assert code != 0, text[-5000:]
    assert stopped_after < 120, stopped_after  # failed, did not hang on the dead peer
    assert re.search(rf"rank [01] \(local rank [01], pid {victim.pid}\) was killed by SIGKILL",
                     text), text[-5000:]
    assert "rerun with training.resume=auto to continue from it" in text
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                   for p in workers)  # no worker left behind
    assert not (project / MODELS).exists()  # the failed run saved no model

    resumed = run_kedro(project, "training", params + ",training.resume=auto")
    assert resumed.returncode == 0, output(resumed)
    assert "resumed from" in resumed.stdout + resumed.stderr
    history = pd.read_parquet(only_version(project, HISTORY))
    assert history["iteration"].tolist() == list(range(8))  # the checkpoint's + the rest
    assert load_model(project)["iterations"] == 8
