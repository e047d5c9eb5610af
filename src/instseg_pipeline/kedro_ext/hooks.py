"""Project hooks."""
from __future__ import annotations

import logging
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
