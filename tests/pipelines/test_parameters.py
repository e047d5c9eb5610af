"""conf/: every environment's parameters build their typed schemas, the base YAML and the
schema defaults agree, and a node fails on a mistyped key with its dotted name."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from kedro.config import OmegaConfigLoader

from instseg_pipeline.comparison.config import ModelComparisonConfig
from instseg_pipeline.comparison.weak_config import WeakSupervisionConfig
from instseg_pipeline.config_schema import ConfigError
from instseg_pipeline.data.config import IngestionConfig, SourceConfig
from instseg_pipeline.engine.config import TrainingConfig
from instseg_pipeline.evaluation.config import EvaluationConfig
from instseg_pipeline.export.config import ExportConfig
from instseg_pipeline.pipelines.ingestion.nodes import split_images
from instseg_pipeline.settings import CONFIG_LOADER_ARGS

CONF = Path(__file__).resolve().parents[2] / "conf"
SCHEMAS = (SourceConfig, IngestionConfig, TrainingConfig, EvaluationConfig, ExportConfig,
           ModelComparisonConfig, WeakSupervisionConfig)
ENVS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "base")


def parameters(env: str) -> dict:
    """The parameters Kedro resolves for ``env`` (base + env, soft-merged as settings say)."""
    args = {k: v for k, v in CONFIG_LOADER_ARGS.items() if k != "default_run_env"}
    return OmegaConfigLoader(conf_source=str(CONF), env=env, **args)["parameters"]


def test_every_env_is_checked():
    assert {"ci", "cityscapes", "coco", "local", "mask_folder"} <= set(ENVS)


@pytest.mark.parametrize("env", ENVS)
def test_every_env_builds_every_schema(env):
    params = parameters(env)
    assert set(params) == {schema.BLOCK for schema in SCHEMAS}, "a block without a schema"
    for schema in SCHEMAS:
        schema.from_params(params[schema.BLOCK])


def test_base_yaml_states_the_schema_defaults():
    """One value per default: the YAML and the schema cannot drift (batch_size was 2 vs 4)."""
    params = parameters("local")
    for schema in (SourceConfig, IngestionConfig, EvaluationConfig, ExportConfig,
                   ModelComparisonConfig, WeakSupervisionConfig):
        assert schema.from_params(params[schema.BLOCK]) == schema(), schema.__name__
    training = params["training"]  # model: an open block, its defaults are the registry's
    assert TrainingConfig.from_params(training) == TrainingConfig(
        checkpoint_dir=training["checkpoint_dir"], model=training["model"],
        families=training["families"])


def test_a_node_refuses_a_mistyped_key_by_its_dotted_name():
    images = pd.DataFrame({"image_id": [1], "split": [""]})
    with pytest.raises(ConfigError, match=r"^ingestion\.val_fractoin: unknown key; known: "):
        split_images(images, {"val_fractoin": 0.3, "split_seed": 0})
