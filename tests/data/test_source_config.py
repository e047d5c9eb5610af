"""The ``source`` and ``ingestion`` block schemas: dotted errors, and the synthetic defaults."""
from __future__ import annotations

import pytest

from instseg_pipeline.config_schema import ConfigError
from instseg_pipeline.data.config import IngestionConfig, SourceConfig


def test_mistyped_key_names_its_dotted_path():
    with pytest.raises(ConfigError, match=r"^source\.synthetic\.num_image: unknown key; known: "
                                          r"crowd_fraction, empty_fraction, max_objects"):
        SourceConfig.from_params({"synthetic": {"num_image": 10}})
    with pytest.raises(ConfigError) as info:
        IngestionConfig.from_params({"val_fractio": 0.3})
    assert str(info.value) == ("ingestion.val_fractio: unknown key; known: box_only, split_seed, "
                               "val_fraction")


def test_mistyped_value_names_its_dotted_path_and_the_expected_type():
    with pytest.raises(ConfigError) as info:
        SourceConfig.from_params({"type": "voc"})
    assert str(info.value) == ("source.type: expected one of 'synthetic', 'coco', 'coco_panoptic', "
                               "'cityscapes', "
                               "'mask_folder', got 'voc'")
    with pytest.raises(ConfigError) as info:
        IngestionConfig.from_params({"val_fraction": "a fifth"})
    assert str(info.value) == "ingestion.val_fraction: expected float, got 'a fifth'"


def test_list_or_single_string_keys():
    config = SourceConfig.from_params({"splits": "val", "image_glob": ["*.png"]})
    assert config.splits == "val" and config.image_glob == ("*.png",)
