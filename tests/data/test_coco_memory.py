"""Peak memory of a COCO ingestion against its stated bound (`sources.coco.memory_bound`).

A fresh subprocess reads a hostile file built from coco128 (a coordinate of 1e12, which
once made ingestion grow to 24 GB; absurd vertex and run counts; a record declaring a
100000 x 100000 image) and one with tens of thousands of image records (the json shape
that costs the most Python objects per byte). Its VmHWM must stay well under
``R0 + memory_bound(F, H, W, O)``, R0 being its peak before reading. The subprocess runs
under an address-space cap, so a regression fails this test instead of the machine.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from instseg_pipeline.data import masks
from instseg_pipeline.data.sources.coco import memory_bound

HERE = Path(__file__).parent
ADDRESS_SPACE_CAP = 8 << 30
MARGIN = 0.5  # the measured growth must stay under half of what the bound allows

SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[2])
from memory_guard import peak_rss_bytes
from instseg_pipeline.data.config import SourceConfig
from instseg_pipeline.data.quality import QualityReport
from instseg_pipeline.data.sources import coco

params = SourceConfig.from_params(json.loads(sys.argv[1]))
before = peak_rss_bytes()
report = QualityReport("coco", "skip")
tables = coco.read(params, report)
summary = report.summary(tables.images, tables.instances)
print(json.dumps({"before": before, "peak": peak_rss_bytes(),
                  "rle_chars": int(tables.instances["rle"].str.len().sum()),
                  "images": summary["images"], "instances": summary["instances"],
                  "dropped": summary["dropped"]}))
"""


def _cap_address_space() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = ADDRESS_SPACE_CAP if hard == resource.RLIM_INFINITY else min(ADDRESS_SPACE_CAP, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))


def _ingest(root: Path, images: str) -> dict:
    params = {"type": "coco", "root": str(root), "annotations": "annotations.json",
              "images": images, "verify_images": "header", "workers": 0}
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(params), str(HERE)],
                          capture_output=True, text=True, timeout=600,
                          preexec_fn=_cap_address_space, check=False)
    assert done.returncode == 0, f"ingestion subprocess failed ({done.returncode}):\n" \
                                 f"{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def hostile_coco(source: Path) -> tuple[dict, dict[str, int]]:
    """coco128's instances json plus hostile annotations; the reasons they must get."""
    data = json.loads(source.read_text())
    image = next(im for im in data["images"] if im["id"] == 74)  # 640 x 426
    height, width = image["height"], image["width"]
    template = next(a for a in data["annotations"] if a["image_id"] == 74
                    and isinstance(a["segmentation"], list))
    polygon = list(template["segmentation"][0])
    polygon[4] = 1e12  # the value that once cost 24 GB
    zigzag = [-width, -height, 2 * width, 2 * height, -width, 2 * height, 2 * width, -height]
    runs = masks.max_rle_runs(height, width)
    hostile = [
        ("polygon_out_of_bounds", {"segmentation": [polygon]}),
        ("polygon_too_many_vertices",
         {"segmentation": [[1, 2] * (masks.max_polygon_vertices(height, width) + 1000)]}),
        ("polygon_too_long", {"segmentation": [zigzag * 120]}),
        ("rle_too_many_runs", {"segmentation": {"size": [height, width],
                                                "counts": [0] * (runs + 200_000)}}),
        ("rle_too_many_runs", {"segmentation": {"size": [height, width],
                                                "counts": "1" * (6 * runs + 1)}}),
        ("rle_too_many_runs", {"segmentation": {"size": [height, width],
                                                "counts": "1" * (2 * runs)}}),
        ("bbox_out_of_bounds", {"bbox": [1e12, 0, 5, 5]}),
    ]
    expected: dict[str, int] = {}
    next_id = max(a["id"] for a in data["annotations"]) + 1
    for offset, (reason, change) in enumerate(hostile):
        data["annotations"].append({**template, "id": next_id + offset, **change})
        expected[reason] = expected.get(reason, 0) + 1
    # a record declaring a huge image, with a two-part polygon that would be merged at
    # that size (4 bytes per pixel: 40 GB)
    data["images"].append({"id": 10**9, "file_name": image["file_name"],
                           "width": 100_000, "height": 100_000})
    data["annotations"].append({**template, "id": next_id + len(hostile), "image_id": 10**9,
                                "segmentation": [[0, 0, 99_000, 0, 99_000, 99_000],
                                                 [5, 5, 9_000, 5, 9_000, 9_000]]})
    expected["image_dropped"] = 1
    return data, expected


def _link_images(root: Path, coco128: Path) -> None:
    (root / "train2017").symlink_to(coco128 / "train2017", target_is_directory=True)


def _check_bound(result: dict, size: int, height: int, width: int) -> None:
    allowed = memory_bound(size, height, width, result["rle_chars"])
    grown = result["peak"] - result["before"]
    print(f"\nfile {size / 2**20:.1f} MiB, largest image {width}x{height}: "
          f"R0 {result['before'] / 2**20:.0f} MiB, peak {result['peak'] / 2**20:.0f} MiB, "
          f"growth {grown / 2**20:.0f} MiB, bound R0 + {allowed / 2**20:.0f} MiB")
    assert grown < MARGIN * allowed, (grown, allowed)


def test_hostile_coco128_file_stays_within_the_memory_bound(tmp_path, coco128_dir):
    data, expected = hostile_coco(coco128_dir / "annotations/instances_train2017.json")
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(data))
    _link_images(tmp_path, coco128_dir)
    result = _ingest(tmp_path, "train2017")
    assert result["instances"] == 939 and result["images"] == 128
    assert result["dropped"]["annotations"] == expected
    assert result["dropped"]["images"] == {"too_many_pixels": 1}
    # the 100000 x 100000 record is dropped before conversion: the largest image that
    # reaches the geometry checks is coco128's own
    height, width = max(((im["height"], im["width"]) for im in data["images"][:-1]),
                        key=lambda hw: hw[0] * hw[1])
    _check_bound(result, path.stat().st_size, height, width)


@pytest.mark.parametrize("records", [20_000])
def test_many_image_records_stay_within_the_memory_bound(tmp_path, coco128_dir, records):
    """Image records are the costliest json per byte (each is copied with its path)."""
    source = json.loads((coco128_dir / "annotations/instances_train2017.json").read_text())
    image = source["images"][0]
    data = {"images": [{"id": i, "file_name": image["file_name"], "width": image["width"],
                        "height": image["height"]} for i in range(1, records + 1)],
            "annotations": [], "categories": source["categories"]}
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(data, separators=(",", ":")))
    _link_images(tmp_path, coco128_dir)
    result = _ingest(tmp_path, "train2017")
    assert result["images"] == records
    _check_bound(result, path.stat().st_size, image["height"], image["width"])
