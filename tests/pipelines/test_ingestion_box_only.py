"""``ingestion.box_only``: simulated box-only train images after the split, in the pipeline."""
from __future__ import annotations

import pandas as pd
import pytest
from coco_fixtures import coco_params, decode, make_coco
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from instseg_pipeline.config_schema import ConfigError
from instseg_pipeline.pipelines.ingestion import create_pipeline
from instseg_pipeline.pipelines.ingestion.nodes import simulate_box_only

NODES = ("ingest_source", "split_images", "simulate_box_only")


def _run(root, ingestion: dict) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    catalog = DataCatalog({"params:source": MemoryDataset(coco_params(root)),
                           "params:ingestion": MemoryDataset(ingestion)})
    # free outputs of a slice stay in the catalog: read the split before the last node
    SequentialRunner().run(create_pipeline().only_nodes(*NODES[:2]), catalog)
    images, read = catalog.load("images"), catalog.load("source_instances")
    SequentialRunner().run(create_pipeline().only_nodes(NODES[2]), catalog)
    return images, read, catalog.load("instances")


def test_fraction_zero_leaves_the_instances_as_read(tmp_path):
    make_coco(tmp_path, n_images=6)
    images, read, instances = _run(tmp_path, {"val_fraction": 0.5})
    assert instances.equals(read) and set(instances["mask_source"]) == {"annotated"}
    assert simulate_box_only(images, read, coco_params(tmp_path), {}) is read


def test_half_the_train_images_get_box_masks_and_val_is_untouched(tmp_path):
    make_coco(tmp_path, n_images=8)
    ingestion = {"val_fraction": 0.5,
                 "box_only": {"fraction": 0.5, "method": "box", "workers": 0, "seed": 3}}
    images, read, instances = _run(tmp_path, ingestion)
    train = set(images.loc[images["split"] == "train", "image_id"])
    assert 0 < len(train) < len(images)
    pseudo = instances[instances["mask_source"] == "box"]
    changed = set(pseudo["image_id"])
    assert changed <= train and len(changed) == int(len(train) / 2 + 0.5)  # half up
    # every non-crowd instance of a chosen image, and nothing else
    chosen = instances["image_id"].isin(changed) & ~instances["iscrowd"]
    assert (instances["mask_source"] == "box").tolist() == chosen.tolist()
    for row in pseudo.itertuples(index=False):
        x, y, w, h = (int(v) for v in row.bbox)
        mask = decode(row.rle, 30, 40)
        assert mask[y:y + h, x:x + w].all() and row.area == mask.sum() == w * h
    untouched = ~chosen
    assert instances[untouched].equals(read[untouched])
    assert instances.loc[instances["iscrowd"], "mask_source"].eq("annotated").all()
    # the same seed picks the same images
    assert _run(tmp_path, ingestion)[2].equals(instances)


def test_box_only_settings_are_checked_by_their_dotted_name(tmp_path):
    make_coco(tmp_path, n_images=2)
    with pytest.raises(ConfigError, match=r"^ingestion\.box_only\.fraction: must lie in"):
        simulate_box_only(pd.DataFrame(), pd.DataFrame(), coco_params(tmp_path),
                          {"box_only": {"fraction": 2.0}})
    with pytest.raises(ConfigError, match=r"^ingestion\.box_only\.methd: unknown key"):
        simulate_box_only(pd.DataFrame(), pd.DataFrame(), coco_params(tmp_path),
                          {"box_only": {"methd": "box"}})
