"""The ``evaluation`` block schema: dotted errors for a mistyped key and a mistyped value."""
from __future__ import annotations

import pytest

from instseg_pipeline.config_schema import ConfigError
from instseg_pipeline.evaluation.config import EvaluationConfig


def test_mistyped_key_names_its_dotted_path():
    with pytest.raises(ConfigError) as info:
        EvaluationConfig.from_params({"panoptic": {"min_areaa": 4}})
    assert str(info.value) == ("evaluation.panoptic.min_areaa: unknown key; known: min_area, "
                               "overlap_threshold, score_threshold, stuff_min_area")


def test_mistyped_value_names_its_dotted_path_and_the_expected_type():
    with pytest.raises(ConfigError) as info:
        EvaluationConfig.from_params({"batch_size": "4"})
    assert str(info.value) == "evaluation.batch_size: expected int, got '4'"
    with pytest.raises(ConfigError) as info:
        EvaluationConfig.from_params({"iou_types": ["segm", "mask"]})
    assert str(info.value) == ("evaluation.iou_types[1]: expected one of 'segm', 'bbox', "
                               "got 'mask'")
