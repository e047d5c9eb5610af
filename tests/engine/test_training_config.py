"""The ``training`` block schema: dotted errors, and what the engine relies on."""
from __future__ import annotations

import pytest

from instseg_pipeline.config_schema import ConfigError
from instseg_pipeline.engine.config import TrainingConfig

DIR = {"checkpoint_dir": "data/06_models/checkpoints/x"}


def test_mistyped_key_names_its_dotted_path():
    with pytest.raises(ConfigError) as info:
        TrainingConfig.from_params({**DIR, "optimizer": {"lrr": 0.1}})
    assert str(info.value) == ("training.optimizer.lrr: unknown key; known: lr, momentum, name, "
                               "weight_decay")


def test_mistyped_value_names_its_dotted_path_and_the_expected_type():
    with pytest.raises(ConfigError) as info:
        TrainingConfig.from_params({**DIR, "max_iters": "ten"})
    assert str(info.value) == "training.max_iters: expected int, got 'ten'"
    with pytest.raises(ConfigError, match=r"^training\.selection\.iou_type: expected one of"):
        TrainingConfig.from_params({**DIR, "selection": {"iou_type": "mask"}})
    with pytest.raises(ConfigError, match=r"^training\.max_iters: must be >= 1, got 0$"):
        TrainingConfig.from_params({**DIR, "max_iters": 0})
    with pytest.raises(ConfigError, match=r"^training\.checkpoint_dir: required key missing$"):
        TrainingConfig.from_params({})


def test_open_blocks_stay_open():
    """Other families name other losses and accept other model keys (the registry checks)."""
    config = TrainingConfig.from_params({**DIR, "loss_weights": {"loss_cate": 2},
                                         "model": {"name": "solov2", "num_grids": [40, 36]}})
    assert config.loss_weights == {"loss_cate": 2.0}
    assert config.model == {"name": "solov2", "num_grids": [40, 36]}
    assert TrainingConfig(**DIR).loss_weights == {}


def test_a_loss_weight_the_family_does_not_return_is_refused():
    """A misspelt loss would otherwise keep weighing 1.0 without a word."""
    from instseg_pipeline.engine.fit import check_loss_weights
    from instseg_pipeline.models import build_model

    model = build_model({"name": "maskrcnn_tiny"}, num_classes=3)
    check_loss_weights(TrainingConfig(**DIR), model)  # the YAML's five names pass
    config = TrainingConfig.from_params({**DIR, "loss_weights": {"loss_mak": 2.0}})
    with pytest.raises(ConfigError) as info:
        check_loss_weights(config, model)
    assert str(info.value) == (
        "training.loss_weights.loss_mak: not a loss of maskrcnn_tiny; its losses: "
        "loss_classifier, loss_box_reg, loss_mask, loss_objectness, loss_rpn_box_reg")
