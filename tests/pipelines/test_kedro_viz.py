"""`kedro viz build --include-previews` writes the static Kedro-Viz site offline: every
dataset on its catalog layer, and previews of tables, JSON reports and matplotlib figures.

The build runs on a throwaway copy of the configuration after a tiny ingestion run (the
previews need saved data), with VIZ_METADATA applied: the catalog metadata the site needs
(see its comments). Kedro-Viz reports a failed build on stdout with exit status 0, so the
test checks the output and the files, not only the status.
"""
from __future__ import annotations

import base64
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from kedro.io.core import parse_dataset_definition
from kedro_fixtures import copy_project

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY = {"source": {"synthetic": {"num_images": 8, "min_size": 64, "max_size": 96}},
        "ingestion": {"val_fraction": 0.3}}

# Matplotlib figures need no preview metadata: MatplotlibDataset.preview() takes no
# arguments and returns the latest saved PNG (preview_args would break it). What the build
# needs is below; each entry's kedro-viz block replaces the one in conf/base/catalog.yml.
VIZ_METADATA = """
data_quality_report:
  metadata:
    kedro-viz:
      layer: reporting  # no preview_args: JSONDataset.preview() takes none
"""


def _apply_viz_metadata(catalog_path: Path) -> dict:
    catalog = yaml.safe_load(catalog_path.read_text())
    for name, entry in yaml.safe_load(VIZ_METADATA).items():
        catalog[name]["metadata"] = entry["metadata"]
    catalog_path.write_text(yaml.safe_dump(catalog, sort_keys=False))
    return catalog


def _ingest(project: Path) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(project)
        patch.setenv("INSTSEG_MLFLOW", "off")
        bootstrap_project(project)
        with KedroSession.create(project_path=project, runtime_params=TINY) as session:
            session.run(pipeline_names=["ingestion"])


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> dict:
    """The built site (folder, api/main, catalog config) of an ingested throwaway project."""
    project = copy_project(tmp_path_factory.mktemp("viz"))
    catalog = _apply_viz_metadata(project / "conf" / "base" / "catalog.yml")
    _ingest(project)
    kedro = str(Path(sys.executable).with_name("kedro"))
    env = {**os.environ, "INSTSEG_MLFLOW": "off", "COLUMNS": "200"}
    result = subprocess.run([kedro, "viz", "build", "--include-previews"], cwd=project,
                            env=env, capture_output=True, text=True, timeout=300, check=False)
    output = result.stdout[-4000:] + result.stderr[-4000:]
    assert result.returncode == 0 and "Success" in result.stdout, output
    build = project / "build"
    main = json.loads((build / "api" / "main").read_text())
    return {"project": project, "build": build, "main": main, "catalog": catalog}


def _data_nodes(main: dict) -> dict[str, dict]:
    return {n["name"]: n for n in main["nodes"] if n["type"] == "data"}


def _node_details(site: dict, name: str) -> dict:
    node_id = _data_nodes(site["main"])[name]["id"]
    return json.loads((site["build"] / "api" / "nodes" / node_id).read_text())


def _latest(project: Path, name: str) -> Path:
    folder = project / "data" / "08_reporting" / "synthetic" / name
    return max(folder.iterdir()) / name


def test_build_writes_the_static_site(site):
    build = site["build"]
    assert "<html" in (build / "index.html").read_text().lower()
    pipelines = {p["id"] for p in site["main"]["pipelines"]}
    assert {"__default__", "synthetic", "ingestion", "training", "evaluation"} <= pipelines
    for pipeline in pipelines:
        assert json.loads((build / "api" / "pipelines" / pipeline).read_text())["nodes"]


def test_every_dataset_sits_on_its_catalog_layer(site):
    nodes = _data_nodes(site["main"])
    expected = {"images", "instances", "categories", "stuff_segments", "data_quality_report",
                "dataset_statistics", "dataset_statistics_plot", "model", "training_history",
                "validation_history", "training_curves", "predictions", "coco_metrics",
                "pq_metrics", "cityscapes_metrics", "matched_mask_ious"}
    assert expected <= set(nodes), sorted(expected - set(nodes))
    layers = {name: entry["metadata"]["kedro-viz"]["layer"]
              for name, entry in site["catalog"].items() if name in nodes}
    assert {name: nodes[name].get("layer") for name in layers} == layers
    # kedro-viz lists no layer at all when the layers' data flow has a cycle
    layers = site["main"]["layers"]
    assert {"primary", "models", "model_output", "reporting", "export"} <= set(layers)
    assert layers.index("reporting") < layers.index("export")
    assert nodes["dataset_statistics_plot"]["dataset_type"].endswith("MatplotlibDataset")


def test_figures_are_previewed_as_the_latest_saved_png(site):
    details = _node_details(site, "dataset_statistics_plot")
    assert details["preview_type"] == "ImagePreview"
    png = base64.b64decode(details["preview"])
    assert png.startswith(b"\x89PNG")
    assert png == _latest(site["project"], "dataset_statistics.png").read_bytes()
    # not produced by an ingestion run: listed, without a preview
    assert _node_details(site, "training_curves").get("preview") is None


def test_tables_and_reports_are_previewed(site):
    images = _node_details(site, "images")
    assert images["preview_type"] == "TablePreview"
    assert "image_id" in images["preview"]["columns"] and len(images["preview"]["data"]) == 5
    report = _node_details(site, "data_quality_report")
    assert report["preview_type"] == "JSONPreview"
    assert json.loads(report["preview"])["images"] == TINY["source"]["synthetic"]["num_images"]
    instances = _node_details(site, "instances")  # a picture of the masks, not a table
    assert instances["preview_type"] == "ImagePreview"
    assert base64.b64decode(instances["preview"]).startswith(b"\x89PNG")


def test_preview_args_fit_each_datasets_preview_signature(site):
    for name, entry in site["catalog"].items():
        viz = (entry.get("metadata") or {}).get("kedro-viz") or {}
        if "preview_args" not in viz:
            continue
        dataset_class, _ = parse_dataset_definition(dict(entry))
        accepted = inspect.signature(dataset_class.preview).parameters
        unknown = set(viz["preview_args"]) - set(accepted)
        assert not unknown, f"catalog entry {name}: {dataset_class.__name__}.preview() " \
                            f"takes no {sorted(unknown)}"
