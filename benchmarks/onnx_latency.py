"""ONNX Runtime latency against eager PyTorch, per session configuration.

Exports the model once per opset, then times every configuration below on the same
images: eager torch and onnxruntime take turns (a block of all images each, per repeat) at
the same intra-op thread count, so each row's ratio compares numbers from the same minutes
of the same run. Ratio < 1: onnxruntime is faster. Parity (max box / score difference, min
mask IoU) is printed per opset so a fast configuration that drifts shows up.

The model: a trained-model file (``--model data/06_models/<source>/model.pt/<ver>/model.pt``)
or, by default, the untrained ``--name`` (maskrcnn_tiny at min_size 224 / max_size 256)
keeping ``--detections`` per image (an untrained head keeps the maximum, so this sets how
many masks get pasted, which is most of the post-processing cost).

    python benchmarks/onnx_latency.py [--images DIR] [--count 6] [--repeats 5] [--threads 1 2]
    python benchmarks/onnx_latency.py --model data/06_models/synthetic/model.pt/<ver>/model.pt \
        --images data/01_raw/synthetic/images
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from instseg_pipeline.data.images import load_image
from instseg_pipeline.export import latency, parity
from instseg_pipeline.export.manifest import library_versions
from instseg_pipeline.export.onnx import DEFAULT_OPSET, DEFAULT_SESSION, export_onnx
from instseg_pipeline.models import build_model, load_model
from instseg_pipeline.models.torch_files import load_weights_only

DEFAULT_IMAGES = Path(__file__).resolve().parents[2] / "shared/data/coco128/val2017"
BASE = dict(DEFAULT_SESSION)
SESSIONS = {  # name -> onnxruntime options over BASE
    "all (default)": {},
    "extended": {"graph_optimization_level": "extended"},
    "basic": {"graph_optimization_level": "basic"},
    "disable": {"graph_optimization_level": "disable"},
    "all, mem_pattern off": {"enable_mem_pattern": False},
    "all, parallel, inter 2": {"execution_mode": "parallel", "inter_op_num_threads": 2},
}
OTHER_OPSETS = (11, 13, 16, 18)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES,
                        help="folder of images (default: coco128 val2017; generated if absent)")
    parser.add_argument("--count", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--model", type=Path, help="trained-model file (TorchModelDataset)")
    parser.add_argument("--name", default="maskrcnn_tiny")
    parser.add_argument("--min-size", type=int, default=224)
    parser.add_argument("--max-size", type=int, default=256)
    parser.add_argument("--detections", type=int, default=20)
    parser.add_argument("--opsets", type=int, nargs="*", default=list(OTHER_OPSETS),
                        help="opsets tried besides the default, with the default session")
    return parser.parse_args(argv)


def _images(folder: Path, count: int) -> list[np.ndarray]:
    """uint8 RGB [H, W, 3]: the first ``count`` images of ``folder``, else seeded noise."""
    found = folder.glob("*") if folder.is_dir() else []
    files = sorted(p for p in found if p.suffix.lower() in IMAGE_SUFFIXES)[:count]
    if files:
        return [load_image(f)[0] for f in files]
    rng = np.random.default_rng(0)
    sizes = [(480, 640), (427, 640), (640, 480), (375, 500)]
    return [rng.integers(0, 256, (*sizes[i % 4], 3), dtype=np.uint8) for i in range(count)]


def _network(args: argparse.Namespace):
    if args.model:
        saved = load_weights_only(args.model, "model file")
        return load_model(saved["config"], saved["state_dict"]).eval()
    torch.manual_seed(0)
    params = {"name": args.name, "min_size": args.min_size, "max_size": args.max_size,
              "box_detections_per_img": args.detections}
    return build_model(params, 3).eval()


def _row(network, onnx_path: Path, images, threads: int, args, session: dict) -> dict:
    ms = latency.time_backends(network, onnx_path, images, threads, args.warmup, args.repeats,
                              {**BASE, **session})
    stats = {name: latency.latency_stats(values) for name, values in ms.items()}
    return {"torch": stats["torch"], "ort": stats["onnxruntime"],
            "ratio": stats["onnxruntime"]["median_ms"] / stats["torch"]["median_ms"],
            "ratio_p90": stats["onnxruntime"]["p90_ms"] / stats["torch"]["p90_ms"]}


def _print_row(opset: int, threads: int, name: str, row: dict) -> None:
    print(f"{opset:>5} {threads:>7}  {name:<24} {row['torch']['median_ms']:>9.1f} "
          f"{row['torch']['p90_ms']:>8.1f} {row['ort']['median_ms']:>9.1f} "
          f"{row['ort']['p90_ms']:>8.1f} {row['ratio']:>7.2f} {row['ratio_p90']:>7.2f}",
          flush=True)


def _parity_line(network, onnx_path: Path, images, opset: int) -> str:
    arrays, ids = parity.insert_blank(list(images), list(range(len(images))))
    report = parity.check_parity(network, onnx_path, arrays, image_ids=ids)
    return (f"opset {opset}: parity {'pass' if report['passed'] else 'FAIL'}, max box diff "
            f"{report['max_box_diff']:.2e} px, max score diff {report['max_score_diff']:.2e}, "
            f"min mask IoU {report['min_mask_iou']:.4f}")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.WARNING)
    images, network = _images(args.images, args.count), _network(args)
    shapes = sorted({im.shape[:2] for im in images})
    print(f"{args.model or args.name}: {len(images)} images {shapes}, {args.repeats} repeats; "
          f"torch {torch.__version__}, {library_versions()['onnxruntime']} onnxruntime")
    print(f"{'opset':>5} {'threads':>7}  {'session':<24} {'torch ms':>9} {'p90':>8} "
          f"{'ort ms':>9} {'p90':>8} {'ratio':>7} {'r p90':>7}")
    notes = []
    with tempfile.TemporaryDirectory() as folder:
        for opset in [DEFAULT_OPSET, *args.opsets]:
            path = Path(folder) / f"model_{opset}.onnx"
            export_onnx(network, path, opset=opset, example=images[0])
            notes.append(_parity_line(network, path, images, opset))
            sessions = SESSIONS if opset == DEFAULT_OPSET else {"all (default)": {}}
            for threads in args.threads:
                for name, session in sessions.items():
                    _print_row(opset, threads, name, _row(network, path, images, threads,
                                                          args, session))
    print("\n".join(notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
