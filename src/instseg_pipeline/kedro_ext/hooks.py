"""Project hooks."""
from __future__ import annotations

import logging
import re
import sys

from kedro.framework.hooks import hook_impl

logger = logging.getLogger(__name__)


def _end_leftover_runs(status: str) -> None:
    # kedro-mlflow re-enters its run at every node; with MLflow 3 each re-entry stacks the
    # same run again, and its single end_run() leaves the rest active. A second session in the
    # same process (a notebook, a test) would then log into the previous run.
    mlflow = sys.modules.get("mlflow")
    if mlflow is None:
        return
    ended = 0
    while mlflow.active_run() is not None:
        mlflow.end_run(status)
        ended += 1
    if ended:
        logger.debug("closed %d stacked MLflow run handle(s)", ended)
    # The plugin's hook is a process-wide singleton that keeps the last run id; a later
    # session with tracking off would re-open that run at every node (in another store,
    # even). Forget it once the pipeline is over.
    plugin = sys.modules.get("kedro_mlflow.framework.hooks.mlflow_hook")
    if plugin is not None and hasattr(plugin, "mlflow_hook"):
        plugin.mlflow_hook.run_id = None


class MlflowRunCleanupHook:
    """Leaves no MLflow run active once a pipeline has finished or failed."""

    @hook_impl
    def after_pipeline_run(self) -> None:
        _end_leftover_runs("FINISHED")

    @hook_impl
    def on_pipeline_error(self) -> None:
        _end_leftover_runs("FAILED")


def tracking_node(params: dict) -> bool:
    """Whether this node's ``kedro run`` tracks in MLflow: one node per multi-node run.

    ``training.distributed.node_rank`` 0 tracks; nodes 1..nnodes-1 do not. Every node's
    `fit` returns global rank 0's result, so node 0 logs what rank 0 trained; under the
    static rendezvous node 0 hosts rank 0 itself. Read leniently: a malformed block is left
    to the training schema to report (an ingestion run must not fail on it here).
    """
    launch = ((params or {}).get("training") or {}).get("distributed") or {}
    try:
        nnodes, node_rank = int(launch.get("nnodes", 1)), int(launch.get("node_rank", 0))
    except (TypeError, ValueError):
        return True
    return nnodes <= 1 or node_rank == 0


class DistributedTrackingHook:
    """On nodes 1..nnodes-1 of a multi-node run, kedro-mlflow tracks no pipeline.

    kedro-mlflow reads its configuration in its own ``after_context_created`` (plugin hooks
    run before the project's) and opens the run in ``before_pipeline_run`` unless the
    pipeline is in ``tracking.disable_tracking.pipelines``: this hook puts every pipeline
    there, before any run is opened. The DDP workers never track (no MLflow run exists in
    them), so a multi-node run has one MLflow run, on node 0.
    """

    @hook_impl
    def after_context_created(self, context) -> None:
        if tracking_node(context.params):
            return
        launch = context.params["training"]["distributed"]
        config = getattr(context, "mlflow", None)  # kedro-mlflow's config, once it ran
        if config is None:
            if "kedro_mlflow" in sys.modules:
                logger.warning("node_rank %s: kedro-mlflow's configuration is not on the "
                               "context, MLflow tracking cannot be switched off on this node",
                               launch.get("node_rank"))
            return
        from kedro.framework.project import pipelines

        from instseg_pipeline.kedro_ext.tracking import PIPELINE_NAMES

        disabled = config.tracking.disable_tracking  # the registry's and the known names
        disabled.pipelines = sorted({*disabled.pipelines, *pipelines, *PIPELINE_NAMES})
        logger.info("node_rank %s of %s: MLflow tracking is off on this node (node_rank 0 "
                    "tracks the run)", launch.get("node_rank"), launch.get("nnodes"))


def runner_name(runner) -> str:
    """``SequentialRunner`` for a runner object, class, name or object repr (Kedro's run
    parameters hold ``<kedro.runner....SequentialRunner object at 0x...>``)."""
    if isinstance(runner, str):
        found = re.fullmatch(r"<([\w.]+) object at 0x[0-9a-fA-F]+>", runner.strip())
        return (found.group(1) if found else runner.strip()).rsplit(".", 1)[-1]
    return runner.__name__ if isinstance(runner, type) else type(runner).__name__


class RunTagsHook:
    """Readable tags on the MLflow run of a ``kedro run``.

    kedro-mlflow tags the run with Kedro's run parameters, whose ``runner`` is the runner
    object (its repr, with a memory address); this hook, running after it, sets the class
    name. When a pipeline loads the trained model (evaluation, export), the run is tagged
    with the model's version, file, SHA-256 and the MLflow run that trained it.
    """

    def __init__(self):
        self.catalog = None

    @hook_impl
    def after_catalog_created(self, catalog) -> None:
        self.catalog = catalog

    @hook_impl
    def before_pipeline_run(self, run_params: dict) -> None:
        from instseg_pipeline.kedro_ext import tracking

        if run_params.get("runner") is not None:
            tracking.set_tags({"runner": runner_name(run_params["runner"])})

    @hook_impl
    def after_dataset_loaded(self, dataset_name: str, data) -> None:
        from instseg_pipeline.kedro_ext import tracking

        if dataset_name != "model" or tracking.active_run_id() is None or not isinstance(
                data, dict):
            return
        path, version = _load_path_and_version(self.catalog, dataset_name)
        tracking.set_tags(tracking.model_identity(path, version, data))


def _load_path_and_version(catalog, name: str) -> tuple[str | None, str | None]:
    """The file a versioned catalog entry loaded and its version (None, None if unknown)."""
    from kedro.io import AbstractVersionedDataset, DatasetError

    dataset = catalog.get(name) if catalog is not None and hasattr(catalog, "get") else None
    if not isinstance(dataset, AbstractVersionedDataset):
        return None, None
    try:
        return str(dataset._get_load_path()), dataset.resolve_load_version()
    except DatasetError as exc:  # no version saved: nothing to name
        logger.debug("no load path for %s: %s", name, exc)
        return None, None
