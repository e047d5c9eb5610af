"""Ingestion speed and memory against the bare pycocotools floor.

Generates a COCO dataset (default 2,000 images x 11 polygons + a crowd RLE on every tenth
image), then runs, each in a fresh process so peak memory is its own:
- floor: pycocotools ``COCO(json)`` + ``annToRLE`` for every annotation (no checks at all);
- ours (header): `sources.coco.read` with ``verify_images: header``;
- ours (decode): the default, which also decodes every image.

Printed per run: the time of the work itself and the memory it added (peak RSS minus the RSS
after imports), then the whole process's wall time and peak RSS, each with its ratio to the
floor. Imports are a fixed cost outside the work: pandas + pyarrow (which the tables need and
every `kedro run` loads anyway) take about a second and 75 MiB, pycocotools alone a fraction.
Target: work-time and work-memory ratios <= 1.5 in header mode, the like-for-like comparison
(the floor never opens an image; header mode opens each one, decode mode decodes it).
The image checks run in forked worker processes (`sources.checks.default_workers`), which
share the parent's pages; their memory is not in these numbers.

    python benchmarks/ingest.py [--images 2000] [--per-image 11] [--repeats 3] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WIDTH, HEIGHT = 128, 96

REPORT = """
def peak_mib():
    # VmHWM: this process's own peak RSS. ru_maxrss would not do: a child started by
    # fork/vfork + exec inherits the parent's high-water mark as its starting value.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def report(started, items, import_mib):
    peak = peak_mib()
    print(json.dumps({"seconds": time.perf_counter() - started, "items": items,
                      "peak_mib": peak, "work_mib": peak - import_mib}))
"""

FLOOR = """
import json, resource, sys, time
from pycocotools.coco import COCO
import contextlib, io
""" + REPORT + """
import_mib = peak_mib()
t = time.perf_counter()
with contextlib.redirect_stdout(io.StringIO()):
    coco = COCO(sys.argv[1])
rles = [coco.annToRLE(a) for a in coco.dataset["annotations"]]
report(t, len(rles), import_mib)
"""

OURS = """
import json, logging, resource, sys, time
from instseg_pipeline.data.config import SourceConfig
from instseg_pipeline.data.quality import QualityReport
from instseg_pipeline.data.sources import coco
""" + REPORT + """
logging.disable(logging.WARNING)
import_mib = peak_mib()
t = time.perf_counter()
params = {"root": sys.argv[1], "annotations": "annotations.json", "images": "images",
          "verify_images": sys.argv[2]}
tables = coco.read(SourceConfig.from_params(params), QualityReport("coco"))
report(t, len(tables.instances), import_mib)
"""


def _polygon(rng: np.random.Generator) -> list[float]:
    cx, cy = rng.uniform(10, WIDTH - 10), rng.uniform(10, HEIGHT - 10)
    radius = rng.uniform(3, 20)
    angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(5, 16))))
    xs = np.clip(cx + radius * np.cos(angles), 0, WIDTH)
    ys = np.clip(cy + radius * np.sin(angles), 0, HEIGHT)
    return np.round(np.stack([xs, ys], 1).ravel(), 2).tolist()


def _crowd(rng: np.random.Generator) -> dict:
    from pycocotools import mask as mask_utils

    bitmap = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    x, y = int(rng.integers(0, WIDTH - 30)), int(rng.integers(0, HEIGHT - 20))
    bitmap[y:y + 20, x:x + 30] = rng.random((20, 30)) > 0.5
    rle = mask_utils.encode(np.asfortranarray(bitmap))
    return {"size": [HEIGHT, WIDTH], "counts": rle["counts"].decode()}


def generate(root: Path, n_images: int, per_image: int, seed: int = 0) -> int:
    """Write ``root/annotations.json`` + ``root/images/*.png``; return the instance count."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    noise = rng.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "template.png")
    blob = (root / "template.png").read_bytes()
    images, annotations = [], []
    for image_id in range(1, n_images + 1):
        (root / "images" / f"{image_id:06d}.png").write_bytes(blob)
        images.append({"id": image_id, "file_name": f"{image_id:06d}.png",
                       "width": WIDTH, "height": HEIGHT})
        for _ in range(per_image):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": int(rng.integers(1, 6)), "iscrowd": 0,
                                "segmentation": [_polygon(rng)]})
        if image_id % 10 == 0:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": 1, "iscrowd": 1, "segmentation": _crowd(rng)})
    categories = [{"id": i, "name": f"class{i}", "supercategory": "thing"} for i in range(1, 6)]
    (root / "annotations.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": categories}))
    return len(annotations)


def _measure(script: str, *args: str) -> dict:
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", script, *args], check=True,
                         capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - started
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="images (default %(default)s)")
    parser.add_argument("--per-image", type=int, default=11,
                        help="polygons per image (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="best of N runs")
    parser.add_argument("--keep", type=Path, help="generate into this folder and keep it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = args.keep or Path(scratch) / "coco"
        n_instances = generate(root, args.images, args.per_image)
        ann_path = str(root / "annotations.json")
        rows = {"floor: COCO() + annToRLE": lambda: _measure(FLOOR, ann_path),
                "ours, verify_images=header": lambda: _measure(OURS, str(root), "header"),
                "ours, verify_images=decode": lambda: _measure(OURS, str(root), "decode")}
        results = {name: min((run() for _ in range(args.repeats)), key=lambda r: r["seconds"])
                   for name, run in rows.items()}
    floor = results["floor: COCO() + annToRLE"]
    print(f"{args.images} images, {n_instances} instances (best of {args.repeats})\n")
    columns = (("work s", "seconds", "7.2f"), ("work MiB", "work_mib", "8.1f"),
               ("process s", "process_seconds", "9.2f"), ("peak MiB", "peak_mib", "8.1f"))
    print(f"{'run':28}" + "".join(f" {title:>9} {'ratio':>5}" for title, _, _ in columns)
          + f" {'kept':>6}")
    for name, r in results.items():
        cells = "".join(f" {r[key]:9{fmt[1:]}} {r[key] / floor[key]:5.2f}"
                        for _, key, fmt in columns)
        print(f"{name:28}{cells} {r['items']:6d}")
    header = results["ours, verify_images=header"]
    ratios = {"work time": header["seconds"] / floor["seconds"],
              "work memory": header["work_mib"] / floor["work_mib"]}
    ok = all(ratio <= 1.5 for ratio in ratios.values())
    print("\ntarget: header mode, " + ", ".join(f"{k} ratio {v:.2f}" for k, v in ratios.items())
          + f" (<= 1.5) -> {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
