"""The ``export`` block schema: dotted errors for a mistyped key and a mistyped value."""
from __future__ import annotations

import pytest

from instseg_pipeline.config_schema import ConfigError, as_dict
from instseg_pipeline.export.config import ExportConfig


def test_mistyped_key_names_its_dotted_path():
    with pytest.raises(ConfigError) as info:
        ExportConfig.from_params({"parity": {"box_atoll": 2.0}})
    assert str(info.value) == ("export.parity.box_atoll: unknown key; known: box_atol, "
                               "mask_iou_min, match_iou, num_images, score_atol, "
                               "semantic_agreement_min")


def test_mistyped_value_names_its_dotted_path_and_the_expected_type():
    with pytest.raises(ConfigError) as info:
        ExportConfig.from_params({"session": {"enable_mem_pattern": "yes"}})
    assert str(info.value) == "export.session.enable_mem_pattern: expected bool, got 'yes'"


def test_session_block_holds_the_onnxruntime_option_names():
    """The node hands the block to onnxruntime's SessionOptions builder key by key."""
    from instseg_pipeline.export.onnx import DEFAULT_SESSION

    assert as_dict(ExportConfig().session) == DEFAULT_SESSION
