"""Training-loop throughput and memory: our pipeline against a plain reference-style loop.

Both train the same Mask R-CNN (R50-FPN by default, weights none) at the same size, batch
and thread count on ../shared/data/coco128, each in a fresh process:
- plain: the loop of torchvision's detection reference, reduced to its core: a COCO
  Dataset that decodes each item's polygons with pycocotools on the fly, a DataLoader, and
  `loss = sum(model(images, targets).values()); backward; step`;
- ours: `instseg_pipeline.engine.fit.fit` on the canonical tables (RLE decoded in the
  Dataset, grouped batches, warmup, clipping, progress bar, checkpoint at the end).
Prints images/s (after warm-up iterations), peak RSS and the ratio ours / plain.
Target: images/s ratio >= 1.0.

    python benchmarks/train.py [--iters 8] [--warmup 2] [--size 320] [--batch 2] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("INSTSEG_SHARED_DATA", REPO.parent / "shared" / "data"))

COMMON = """
import json, resource, sys, time
import torch
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
torch.manual_seed(0)
"""

PLAIN = COMMON + """
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torchvision.models.detection import maskrcnn_resnet50_fpn

root = args["root"]
coco = COCO(root + "/annotations/instances_train2017.json")
ids = sorted(coco.imgs)
cats = {c: i + 1 for i, c in enumerate(sorted(coco.cats))}

class CocoMasks(torch.utils.data.Dataset):
    def __len__(self):
        return len(ids)
    def __getitem__(self, i):
        info = coco.imgs[ids[i]]
        image = Image.open(root + "/train2017/" + info["file_name"]).convert("RGB")
        anns = [a for a in coco.imgToAnns[ids[i]] if not a["iscrowd"]]
        h, w = info["height"], info["width"]
        masks = [mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(
            a["segmentation"], h, w))) for a in anns]
        boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                  a["bbox"][1] + a["bbox"][3]] for a in anns]
        target = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                  "labels": torch.tensor([cats[a["category_id"]] for a in anns],
                                         dtype=torch.int64),
                  "masks": torch.from_numpy(np.stack(masks)) if masks
                  else torch.zeros((0, h, w), dtype=torch.uint8)}
        keep = (target["boxes"][:, 2] > target["boxes"][:, 0] + 1) & (
            target["boxes"][:, 3] > target["boxes"][:, 1] + 1)
        target = {k: v[keep] for k, v in target.items()}
        pixels = torch.from_numpy(np.asarray(image)).permute(2, 0, 1).float() / 255
        return pixels, target

loader = torch.utils.data.DataLoader(CocoMasks(), batch_size=args["batch"], shuffle=True,
                                     collate_fn=lambda b: tuple(zip(*b)))
model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                              num_classes=len(cats) + 1, min_size=args["size"],
                              max_size=args["size"])
model.train()
optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9, weight_decay=1e-4)
done, images, started = 0, 0, None
for batch_images, targets in loader:
    if done == args["warmup"]:
        started = time.perf_counter()
    loss = sum(model(list(batch_images), list(targets)).values())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    done += 1
    if done > args["warmup"]:
        images += len(batch_images)
    if done == args["warmup"] + args["iters"]:
        break
elapsed = time.perf_counter() - started
print(json.dumps({"images_per_s": images / elapsed, "seconds": elapsed,
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

OURS = COMMON + """
import logging
import pandas as pd
from instseg_pipeline.engine import fit as fit_module
from instseg_pipeline.engine.config import TrainingConfig
logging.disable(logging.WARNING)
tables = {n: pd.read_parquet(f"{args['tables']}/{n}.parquet")
          for n in ("images", "instances", "categories")}
images = tables["images"].assign(split="train")
times = []

class Timer:
    def __call__(self, event, info):
        if event == "step_end":
            times.append(time.perf_counter())

params = {"seed": 0, "batch_size": args["batch"], "threads": args["threads"],
          "max_iters": args["warmup"] + args["iters"], "checkpoint_dir": args["ckpt"],
          "checkpoint_every": 0, "val_max_images": 0, "progress_bar": False,
          "log_every": 0, "augmentation": {"preset": "none"},
          "optimizer": {"name": "sgd", "lr": 0.001, "momentum": 0.9, "weight_decay": 1e-4},
          "warmup_iters": 0,
          "model": {"name": "maskrcnn_resnet50_fpn", "min_size": args["size"],
                    "max_size": args["size"]}}
original = fit_module.train
def timed_train(*a, **k):
    k["callbacks"] = tuple(k.get("callbacks", ())) + (Timer(),)
    return original(*a, **k)
fit_module.train = timed_train
result = fit_module.fit(images, tables["instances"], tables["categories"], args["root"],
                        TrainingConfig.from_params(params))
elapsed = times[-1] - times[args["warmup"] - 1]
print(json.dumps({"images_per_s": args["iters"] * args["batch"] / elapsed, "seconds": elapsed,
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _ingest(root: Path, out: Path) -> None:
    from instseg_pipeline.data.config import SourceConfig
    from instseg_pipeline.data.quality import QualityReport
    from instseg_pipeline.data.sources import coco

    source = SourceConfig.from_params({"type": "coco", "root": str(root), "images": "train2017",
                                       "annotations": "annotations/instances_train2017.json"})
    tables = coco.read(source, QualityReport("coco"))
    for name in ("images", "instances", "categories"):
        getattr(tables, name).to_parquet(out / f"{name}.parquet")


def _measure(script: str, args: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", script, json.dumps(args)], check=True,
                         capture_output=True, text=True, env={**os.environ,
                                                              "OMP_NUM_THREADS": str(args["threads"])})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA / "coco128",
                        help="coco128 folder (default %(default)s)")
    parser.add_argument("--iters", type=int, default=8, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first iterations")
    parser.add_argument("--size", type=int, default=320, help="min_size = max_size")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not args.data.exists():
        parser.error(f"{args.data} not found (pass --data or set INSTSEG_SHARED_DATA)")
    with tempfile.TemporaryDirectory() as scratch:
        _ingest(args.data, Path(scratch))
        shared = {"root": str(args.data), "tables": scratch, "ckpt": f"{scratch}/ckpt",
                  "iters": args.iters, "warmup": args.warmup, "size": args.size,
                  "batch": args.batch, "threads": args.threads}
        plain = _measure(PLAIN, shared)
        ours = _measure(OURS, shared)
    print(f"Mask R-CNN R50-FPN, {args.size}px, batch {args.batch}, {args.threads} threads, "
          f"{args.iters} timed iterations after {args.warmup}\n")
    print(f"{'loop':8} {'images/s':>9} {'peak MiB':>9}")
    for name, r in (("plain", plain), ("ours", ours)):
        print(f"{name:8} {r['images_per_s']:9.3f} {r['peak_mib']:9.0f}")
    ratio = ours["images_per_s"] / plain["images_per_s"]
    print(f"\nratio ours/plain: images/s {ratio:.2f}, peak memory "
          f"{ours['peak_mib'] / plain['peak_mib']:.2f}  (target images/s >= 1.0: "
          f"{'met' if ratio >= 1.0 else 'NOT met'})")
    return 0 if ratio >= 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
