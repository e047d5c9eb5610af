"""Model families at their ResNet-50 size: images/s at batch 1 (eager torch and ONNX
Runtime), parameter count, and each one's ratio to Mask R-CNN R50-FPN in the same run.

Random weights (nothing is downloaded), a fixed set of synthetic images (the project's
generator, seeded, shorter side resized to ``--size`` by every network, longer side capped
at ``--max-size``), the same intra-op thread count for torch and onnxruntime
(``--threads``), and each backend timed in turn on the same inputs preprocessed once.
ONNX is measured where the family is exportable (exported to a temporary folder with the
project's exporter, `export.onnx.export_onnx`); a family that is not, or whose export fails,
prints ``n/a`` and the reason.

Fairness with random weights: an untrained head scores its candidates arbitrarily, so the
number of detections, and with it the post-processing (NMS, mask pasting at full size),
would differ by chance. Every family therefore gets the same final cuts: ``--score-threshold``
(default 0: every detection that survives the family's own candidate selection and NMS) and
at most ``--detections`` per image (default 100, COCO's cap), set through the parameters
that make those cuts in each family (`FINAL_CUTS`: Mask R-CNN box_score_thresh /
box_detections_per_img, YOLACT score_threshold / detections_per_img, SOLOv2
update_threshold / max_per_image, the simple baseline score_threshold / top_k). Candidate
thresholds that come before the masks are computed (SOLOv2's score_threshold, the simple
baseline's center_threshold) keep the papers' values: lowering them would compute a mask
for every grid cell and class. The table prints the cuts each network reports
(`ModelFamily.postprocess_cuts`) and the mean number of detections per image it returned,
so a family whose random head yields fewer detections (hence less post-processing, and no
example to trace an ONNX export with) shows. Names that are not registered are skipped
with a note. A failing ONNX export prints ``n/a`` and the error's first line (the
TorchScript exporter also dumps the traced graph, sent to stderr here).

    python benchmarks/families.py [--images 8] [--warmup 2] [--threads 2] [--size 320]
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from instseg_pipeline.comparison.speed import count_parameters, eager_fps, onnx_fps
from instseg_pipeline.data.images import load_image
from instseg_pipeline.data.sources.synthetic import generate
from instseg_pipeline.export.manifest import library_versions
from instseg_pipeline.models import build_model, registry
from instseg_pipeline.predict.backends import TorchBackend
from instseg_pipeline.predict.preprocess import to_chw

BASELINE = "maskrcnn_resnet50_fpn"
NAMES = (BASELINE, "yolact_plus_resnet50_fpn", "solov2_resnet50_fpn",
         "solov2_light_resnet50_fpn", "simpleseg_resnet50_fpn")
NUM_CLASSES = 81  # COCO's 80 things + background: the heads as the papers size them
# per family section: the parameters of its final score threshold and detections cap
FINAL_CUTS = {"maskrcnn": ("box_score_thresh", "box_detections_per_img"),
              "yolact": ("score_threshold", "detections_per_img"),
              "solov2": ("update_threshold", "max_per_image"),
              "simpleseg": ("score_threshold", "top_k")}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8, help="synthetic images timed")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per backend")
    parser.add_argument("--repeats", type=int, default=1, help="timed passes per backend")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads = onnxruntime intra-op threads")
    parser.add_argument("--size", type=int, default=320, help="shorter side (min_size)")
    parser.add_argument("--max-size", type=int, default=533, help="longer side cap")
    parser.add_argument("--score-threshold", type=float, default=0.0)
    parser.add_argument("--detections", type=int, default=100, help="cap per image")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--no-onnx", action="store_true", help="eager torch only")
    parser.add_argument("--models", nargs="+", default=list(NAMES))
    return parser.parse_args(argv)


def _images(count: int, size: int) -> list[np.ndarray]:
    """uint8 RGB [H, W, 3]: ``count`` seeded synthetic scenes of about ``size`` px."""
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "synthetic"
        generate(root, {"num_images": count, "min_size": size, "max_size": size * 3 // 2,
                        "empty_fraction": 0.0, "seed": 0})
        files = sorted(root.rglob("*.png"), key=lambda p: p.name)[:count]
        return [load_image(f)[0] for f in files]


def _params(name: str, args: argparse.Namespace) -> dict:
    """``name`` at ``--size`` with the shared final cuts (`FINAL_CUTS`)."""
    entry = registry.family(name)
    params = {"name": name, "min_size": args.size, "max_size": args.max_size}
    threshold, cap = FINAL_CUTS.get(entry.section, (None, None))
    if threshold in entry.keys and cap in entry.keys:
        params.update({threshold: args.score_threshold, cap: args.detections})
    return params


def _detections(network, inputs: list[np.ndarray]) -> float:
    backend = TorchBackend(network, "cpu")
    return float(np.mean([len(backend(x)["scores"]) for x in inputs]))


def _measure(name: str, arrays: list[np.ndarray], args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    network = build_model(_params(name, args), NUM_CLASSES).eval()
    inputs = [to_chw(a) for a in arrays]
    row = {"name": name, "params": count_parameters(network),
           "cuts": registry.family(name).postprocess_cuts(network),
           "detections": _detections(network, inputs),
           "fps": eager_fps(network, inputs, args.threads, args.warmup, args.repeats),
           "fps_onnx": math.nan, "note": "--no-onnx"}
    if not args.no_onnx:
        row["fps_onnx"], row["note"] = onnx_fps(network, arrays, args.threads, args.warmup,
                                                args.repeats, args.opset)
    return row


def _ratio(value: float, base: float | None) -> str:
    if base is None or math.isnan(value) or math.isnan(base) or not base:
        return "n/a"
    return f"{value / base:.2f}"


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}"


HEADER = (f"{'model':<28} {'params':>12} {'x R50':>6} {'img/s':>7} {'x R50':>6} "
          f"{'onnx img/s':>10} {'x R50':>6} {'det/img':>8} {'threshold':>9} {'cap':>5}")


def _line(r: dict, base: dict | None) -> str:
    return (f"{r['name']:<28} {r['params']:>12,d} "
            f"{_ratio(r['params'], base and base['params']):>6} {_fmt(r['fps']):>7} "
            f"{_ratio(r['fps'], base and base['fps']):>6} {_fmt(r['fps_onnx']):>10} "
            f"{_ratio(r['fps_onnx'], base and base['fps_onnx']):>6} "
            f"{r['detections']:>8.1f} {r['cuts']['score_threshold']:>9.3g} "
            f"{r['cuts']['detections_per_img']:>5d}")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.ERROR)
    # the TorchScript exporter switches its log on during every export and prints the whole
    # traced graph when one fails; on stderr it stays out of the table
    torch._C._jit_set_onnx_log_output_stream("stderr")
    missing = [n for n in args.models if n not in registry.FAMILIES]
    names = [n for n in args.models if n in registry.FAMILIES]
    arrays = _images(args.images, args.size)
    shapes = sorted({a.shape[:2] for a in arrays})
    print(f"{len(arrays)} synthetic images {shapes}, shorter side -> {args.size} "
          f"(longer <= {args.max_size}), {args.threads} threads, batch 1, random weights, "
          f"score threshold {args.score_threshold}, <= {args.detections} detections; "
          f"torch {torch.__version__}, onnxruntime {library_versions()['onnxruntime']}")
    for name in missing:
        print(f"  {name}: not registered, skipped")
    # the baseline first, so every row can print its ratios as soon as it is measured
    names.sort(key=lambda name: name != BASELINE)
    print(HEADER, flush=True)
    rows, base = [], None
    for name in names:
        rows.append(_measure(name, arrays, args))
        base = base or (rows[-1] if name == BASELINE else None)
        print(_line(rows[-1], base), flush=True)
    for r in rows:
        if r["note"]:
            print(f"  {r['name']}: ONNX n/a: {r['note']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
