"""Project settings: configuration loading (soft-merged environments) and hooks."""
from kedro.config import OmegaConfigLoader

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # An env (coco, cityscapes, ...) overrides single keys of `source`, not the whole block.
    "merge_strategy": {"parameters": "soft"},
}

from instseg_pipeline.hooks import MlflowRunCleanupHook  # noqa: E402

# Project hooks run after the plugins' (kedro-mlflow's) hooks of the same name.
HOOKS = (MlflowRunCleanupHook(),)

from instseg_pipeline.tracking import project_tracking_uri, untracked_pipelines  # noqa: E402

CONFIG_LOADER_ARGS["custom_resolvers"] = {
    # `INSTSEG_MLFLOW=off kedro run ...` runs without MLflow tracking (conf/base/mlflow.yml).
    "instseg.untracked_pipelines": untracked_pipelines,
    "instseg.tracking_uri": project_tracking_uri,
}
