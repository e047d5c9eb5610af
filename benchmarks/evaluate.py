"""COCO mask AP speed: our `coco_stats` (faster-coco-eval backend) against plain pycocotools.

Generates a seeded synthetic GT and jittered predictions (segm), evaluates both ways on the
same data in the same process, prints a table of times, their ratio and whether the 12
stats agree, and exits 1 when they do not (or when --min-ratio is given and not met).

    python benchmarks/evaluate.py --images 500 --instances 20
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import logging
import sys
import time

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from instseg_pipeline.evaluation.coco import STAT_NAMES, coco_stats

TOLERANCE = 1e-12


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time COCO segm evaluation: instseg_pipeline.evaluation.coco.coco_stats "
                    "(backend faster-coco-eval, everything from the dicts included) against "
                    "pycocotools COCOeval evaluate+accumulate+summarize on the same data. "
                    "Exit code 1 when the 12 stats differ by more than 1e-12.")
    parser.add_argument("--images", type=int, default=500, help="number of images (%(default)s)")
    parser.add_argument("--instances", type=int, default=20,
                        help="GT instances per image (%(default)s)")
    parser.add_argument("--categories", type=int, default=10,
                        help="number of categories (%(default)s)")
    parser.add_argument("--size", type=int, nargs=2, default=(240, 320), metavar=("H", "W"),
                        help="image height and width in pixels (%(default)s)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="time each side this many times and keep the fastest (%(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (%(default)s)")
    parser.add_argument("--min-ratio", type=float, default=None,
                        help="also exit 1 when the wall-time speed-up over evaluate+accumulate+"
                             "summarize is below this (default: report only)")
    return parser.parse_args(argv)


# ---------------------------------------------------------------- synthetic data

def _ellipse(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """uint8 [H, W] mask of one random ellipse, drawn only inside its own box for speed."""
    ry, rx = rng.uniform(3, height / 4), rng.uniform(3, width / 4)
    cy, cx = rng.uniform(ry, height - ry), rng.uniform(rx, width - rx)
    y0, y1 = int(cy - ry), int(np.ceil(cy + ry))
    x0, x1 = int(cx - rx), int(np.ceil(cx + rx))
    yy, xx = np.mgrid[y0:y1, x0:x1]
    mask = np.zeros((height, width), np.uint8)
    mask[y0:y1, x0:x1] = ((yy + 0.5 - cy) / ry) ** 2 + ((xx + 0.5 - cx) / rx) ** 2 <= 1
    return mask


def _shifted(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The mask moved by up to 4 pixels each way, cut at the border."""
    dy, dx = (int(v) for v in rng.integers(-4, 5, size=2))
    height, width = mask.shape
    out = np.zeros_like(mask)
    out[max(dy, 0):height + min(dy, 0), max(dx, 0):width + min(dx, 0)] = \
        mask[max(-dy, 0):height + min(-dy, 0), max(-dx, 0):width + min(-dx, 0)]
    return out if out.any() else mask


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _annotation(rng, ann_id: int, image_id: int, mask: np.ndarray, categories: int) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"id": ann_id, "image_id": image_id, "category_id": int(rng.integers(1, categories + 1)),
            "segmentation": _rle(mask), "area": float(mask_utils.area(rle)),
            "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": int(rng.random() < 0.02)}


def _detections(rng, image_id: int, gts: list[tuple[dict, np.ndarray]], size) -> list[dict]:
    out = []
    for ann, mask in gts:
        if rng.random() < 0.85:
            out.append({"image_id": image_id, "category_id": ann["category_id"],
                        "score": float(rng.random()), "segmentation": _rle(_shifted(mask, rng))})
    for _ in range(5):  # false positives
        out.append({"image_id": image_id, "category_id": gts[0][0]["category_id"],
                    "score": float(rng.random() * 0.5), "segmentation": _rle(_ellipse(rng, *size))})
    return out


def make_data(args: argparse.Namespace) -> tuple[dict, list[dict]]:
    """COCO GT dict (images x instances, 2% crowd) and ~1.1 results per GT instance."""
    rng = np.random.default_rng(args.seed)
    height, width = args.size
    images, annotations, results = [], [], []
    for image_id in range(1, args.images + 1):
        images.append({"id": image_id, "height": height, "width": width})
        gts = []
        for _ in range(args.instances):
            mask = _ellipse(rng, height, width)
            gts.append((_annotation(rng, len(annotations) + 1, image_id, mask, args.categories),
                        mask))
            annotations.append(gts[-1][0])
        results += _detections(rng, image_id, gts, (height, width))
    categories = [{"id": i, "name": f"class{i}"} for i in range(1, args.categories + 1)]
    return {"images": images, "annotations": annotations, "categories": categories}, results


# ---------------------------------------------------------------- timing

class Clock:
    """Wall and process-CPU seconds; CPU time is what other load on the machine disturbs least."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def time_ours(gt: dict, results: list[dict]) -> tuple[tuple[float, float], np.ndarray]:
    """((wall, cpu) seconds of one `coco_stats` call from the plain dicts, stats [12])."""
    clock = Clock()
    stats = coco_stats(gt, results, iou_type="segm", backend="faster-coco-eval")
    return clock.lap(), np.array([stats[name] for name in STAT_NAMES])


def time_pycocotools(gt: dict, results: list[dict]):
    """((wall, cpu) of evaluate+accumulate+summarize, (wall, cpu) including COCO index and
    loadRes, stats [12])."""
    gt, results = copy.deepcopy(gt), copy.deepcopy(results)  # both get mutated in place
    with contextlib.redirect_stdout(io.StringIO()):
        total = Clock()
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), "segm")
        evaluation = Clock()
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        eval_times, total_times = evaluation.lap(), total.lap()
    return eval_times, total_times, np.asarray(evaluator.stats[:12])


def best_of(repeats: int, run):
    """The run with the smallest wall time (its first element's first number)."""
    return min((run() for _ in range(repeats)), key=lambda result: result[0][0])


# ---------------------------------------------------------------- report

def _row(label: str, times: tuple[float, float], baseline: tuple[float, float]) -> str:
    return (f"{label:<54}{times[0]:>9.3f}{times[1]:>9.3f}"
            f"{baseline[0] / times[0]:>9.2f}x{baseline[1] / times[1]:>8.2f}x")


def print_report(args, data_counts, ours, base) -> tuple[bool, float]:
    """Print the timing and stats tables; return (stats equal, wall speed-up)."""
    ours_times, ours_stats = ours
    base_eval, base_total, base_stats = base
    diff = float(np.max(np.abs(ours_stats - base_stats)))
    equal = diff <= TOLERANCE
    print(f"COCO segm evaluation: {args.images} images x {args.instances} instances "
          f"({data_counts[0]} GT, {data_counts[1]} results, {args.categories} categories, "
          f"{args.size[0]}x{args.size[1]} px), best of {args.repeats}")
    print(f"{'':<54}{'wall s':>9}{'cpu s':>9}{'wall':>10}{'cpu':>9}   (speed-up vs row 1)")
    print(_row("pycocotools COCOeval evaluate+accumulate+summarize", base_eval, base_eval))
    print(_row("pycocotools incl. COCO index + loadRes", base_total, base_eval))
    print(_row("coco_stats(backend=faster-coco-eval), all included", ours_times, base_eval))
    print(f"{'stat':<12}{'pycocotools':>16}{'coco_stats':>16}")
    for name, a, b in zip(STAT_NAMES, base_stats, ours_stats, strict=True):
        print(f"{name:<12}{a:>16.12f}{b:>16.12f}")
    print(f"12 stats equal (max |diff| {diff:.1e} <= {TOLERANCE:g}): {'yes' if equal else 'NO'}")
    return equal, base_eval[0] / ours_times[0]


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    gt, results = make_data(args)
    ours = best_of(args.repeats, lambda: time_ours(gt, results))
    base = best_of(args.repeats, lambda: time_pycocotools(gt, results))
    equal, ratio = print_report(args, (len(gt["annotations"]), len(results)), ours, base)
    if args.min_ratio is not None and ratio < args.min_ratio:
        print(f"wall speed-up {ratio:.2f}x is below --min-ratio {args.min_ratio:g}")
        return 1
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
