"""Project settings: configuration loading (soft-merged environments) and hooks."""
from kedro.config import OmegaConfigLoader

from instseg_pipeline.kedro_ext.dvc_outputs import DvcOutputsHook
from instseg_pipeline.kedro_ext.hooks import (
    DistributedTrackingHook,
    MlflowRunCleanupHook,
    RunTagsHook,
)
from instseg_pipeline.kedro_ext.summary import RunSummaryHook
from instseg_pipeline.kedro_ext.tracking import (
    import_kedro_mlflow_quietly,
    project_tracking_uri,
    untracked_pipelines,
)

# Before Kedro loads the kedro-mlflow plugin, which would warn on every command.
import_kedro_mlflow_quietly()

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # An env (coco, cityscapes, ...) overrides single keys of `source`, not the whole block.
    "merge_strategy": {"parameters": "soft"},
    "custom_resolvers": {
        # `INSTSEG_MLFLOW=off kedro run ...` runs without MLflow tracking (mlflow.yml).
        "instseg.untracked_pipelines": untracked_pipelines,
        # sqlite:///<project root>/mlflow.db, also from notebooks/ (mlflow.yml).
        "instseg.tracking_uri": project_tracking_uri,
    },
}

# Project hooks run after the plugins' (kedro-mlflow's) hooks of the same name: the
# DistributedTrackingHook relies on it (it edits the configuration kedro-mlflow has read).
HOOKS = (MlflowRunCleanupHook(), DistributedTrackingHook(), DvcOutputsHook(), RunTagsHook(),
         RunSummaryHook())
