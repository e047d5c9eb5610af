"""`instseg-predict`: segment image files, write overlays and a COCO results json (and,
for a semantic model, its stuff segments)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import cv2
import numpy as np

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
RESULTS_NAME = "predictions.json"
IMAGES_NAME = "images.json"
STUFF_NAME = "stuff.json"
STUFF_ALPHA = 0.35
STUFF_GREY = 128.0  # stuff tints are the instance palette halfway to this grey: muted


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="instseg-predict",
        description="Segment images with a trained model. Writes <out>/overlays/<name>.png "
                    "(masks tinted, contours and class names drawn), <out>/predictions.json "
                    "(COCO results: image_id, category_id, score, bbox, segmentation RLE) "
                    "and <out>/images.json (image_id -> file); a semantic (panoptic) model "
                    "also writes <out>/stuff.json (image_id, category_id, category_name, "
                    "area, bbox, segmentation RLE per stuff segment: the pixels the "
                    "instances leave free) and draws the stuff in muted colours under the "
                    "instances. Prints a JSON summary.")
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR",
                        help="image files, or folders whose images (not sub-folders) are used")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="trained model file (model.pt) to run with torch; "
                                             "default: the newest data/06_models/<source>/"
                                             "model.pt/<version>/model.pt under the working "
                                             "folder")
    source.add_argument("--onnx", help="exported model.onnx to run with ONNX Runtime (its "
                                       "manifest must sit beside it)")
    parser.add_argument("--out", default="predictions",
                        help="output folder (default: %(default)s)")
    parser.add_argument("--score-threshold", type=float, default=0.5,
                        help="keep instances scoring at least this (default: %(default)s)")
    parser.add_argument("--mask-threshold", type=float, default=0.5,
                        help="mask probability from which a pixel is foreground; instances "
                             "whose mask is then empty are left out (default: %(default)s)")
    parser.add_argument("--stuff-min-area", type=int,
                        help="semantic models: fewest free pixels a stuff category needs to "
                             "make a segment (default: the evaluation's, "
                             "evaluation.panoptic.stuff_min_area in conf/base)")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA when present), cpu or cuda[:N] (default: %(default)s)")
    parser.add_argument("--threads", type=int,
                        help="intra-op threads of torch / ONNX Runtime (default: one per core)")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging level (default: %(default)s)")
    return parser


def collect_images(inputs: list[str]) -> list[Path]:
    """Image files named in ``inputs``, folders expanded to their images (sorted)."""
    found = []
    for item in map(Path, inputs):
        if item.is_dir():
            found += sorted(p for p in item.iterdir()
                            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            found.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such image file or folder")
    return found


def image_ids(paths: list[Path]) -> list[int]:
    """The file stems as ids when all are distinct integers, else 1, 2, 3, ..."""
    stems = [p.stem for p in paths]
    if all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems):
        return [int(s) for s in stems]
    return list(range(1, len(paths) + 1))


def overlay(image: np.ndarray, found, classes: dict, stuff=None,
            stuff_names: dict | None = None) -> np.ndarray:
    """uint8 [H, W, 3] RGB: ``image`` with `Detections` masks tinted, outlined and named
    (text and lines sized to the image, `viz.overlays.label_style`), over a semantic
    model's `StuffSegments` ``stuff`` (`stuff_underlay`)."""
    from instseg_pipeline.viz.overlays import draw_labelled

    captions = [f"{classes.get(int(label), label)} {score:.2f}"
                for label, score in zip(found.labels, found.scores)]
    if stuff is not None and len(stuff):
        image = stuff_underlay(image, stuff, stuff_names or {})
    return draw_labelled(image, found.masks, found.boxes, captions)


def stuff_underlay(image: np.ndarray, stuff, names: dict) -> np.ndarray:
    """uint8 [H, W, 3]: ``image`` with each stuff segment lightly tinted in a muted colour
    of its category and its name written at the segment's innermost pixel."""
    from instseg_pipeline.viz.overlays import _COLORS, inner_point, label_style

    out = image.astype(np.float32)
    scale, width = label_style(image.shape)
    for mask, category_id in zip(stuff.masks.astype(bool), stuff.category_ids):
        rgb = 0.5 * _COLORS[int(category_id) % len(_COLORS)] * 255.0 + 0.5 * STUFF_GREY
        out[mask] = (1 - STUFF_ALPHA) * out[mask] + STUFF_ALPHA * rgb
    out = np.clip(np.round(out), 0, 255).astype(np.uint8)
    for mask, category_id in zip(stuff.masks, stuff.category_ids):
        x, y = inner_point(mask)
        cv2.putText(out, names.get(int(category_id), str(int(category_id))), (x, y),
                    cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), width, cv2.LINE_AA)
    return out


def coco_results(instances: list[dict], image_id: int, category_ids: dict) -> list[dict]:
    """COCO results entries of one image's instances (see `Predictor.predict`)."""
    return [{"image_id": image_id, "category_id": int(category_ids.get(i["label"], i["label"])),
             "score": round(i["score"], 5), "bbox": [round(v, 2) for v in i["bbox"]],
             "segmentation": i["rle"]} for i in instances]


def stuff_results(stuff: list[dict], image_id: int) -> list[dict]:
    """stuff.json entries of one image's stuff dicts (see `Predictor.segment`)."""
    return [{"image_id": image_id, "category_id": s["category_id"],
             "category_name": s["category_name"], "area": s["area"],
             "bbox": [round(v, 2) for v in s["bbox"]], "segmentation": s["rle"]}
            for s in stuff]


def _overlay_path(folder: Path, path: Path, image_id: int, used: set) -> Path:
    name = f"{path.stem}.png" if path.stem not in used else f"{path.stem}_{image_id}.png"
    used.add(path.stem)
    return folder / name


def predict_files(predictor, paths: list[Path], out: Path, score_threshold: float,
                  mask_threshold: float, category_ids: dict | None = None) -> dict:
    """Segment ``paths``; write overlays, predictions.json and images.json into ``out``
    (and stuff.json for a semantic model); returns the summary `main` prints."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    from instseg_pipeline.data.images import ImageProblem, load_image
    from instseg_pipeline.progress import progress

    (out / "overlays").mkdir(parents=True, exist_ok=True)
    results, stuff_found, images, failed, used = [], [], [], [], set()
    with logging_redirect_tqdm():
        # a bar in a terminal, log lines when piped
        for path, image_id in progress(list(zip(paths, image_ids(paths))), unit="image",
                                       disable=len(paths) < 2, desc="segmenting",
                                       logger=logger):
            try:
                image, _ = load_image(path)
            except ImageProblem as exc:
                logger.warning("skipped: %s", exc)
                failed.append(str(path))
                continue
            found = predictor.detect(image, score_threshold, mask_threshold)
            results += coco_results(predictor.to_instances(found), image_id, category_ids or {})
            stuff = predictor.stuff(found) if predictor.semantic else None
            if stuff is not None:
                stuff_found += stuff_results(predictor.to_stuff_dicts(stuff), image_id)
            target = _overlay_path(out / "overlays", path, image_id, used)
            drawn = overlay(image, found, predictor.classes, stuff, predictor.stuff_categories)
            cv2.imwrite(str(target), cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
            images.append({"id": image_id, "file_name": str(path), "width": image.shape[1],
                           "height": image.shape[0], "overlay": str(target)})
            logger.debug("%s: %d instances", path, len(found))
    (out / RESULTS_NAME).write_text(json.dumps(results), encoding="utf-8")
    (out / IMAGES_NAME).write_text(json.dumps(images, indent=1), encoding="utf-8")
    summary = {"images": len(images), "instances": len(results), "failed": failed,
               "predictions": str(out / RESULTS_NAME), "overlays": str(out / "overlays")}
    if predictor.semantic:
        (out / STUFF_NAME).write_text(json.dumps(stuff_found), encoding="utf-8")
        summary.update(stuff_segments=len(stuff_found), stuff=str(out / STUFF_NAME))
    return summary


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    from instseg_pipeline.predict.postprocess import PanopticOptions
    from instseg_pipeline.predict.predictor import ManifestError, load_predictor

    try:
        paths = collect_images(args.inputs)
        panoptic = PanopticOptions() if args.stuff_min_area is None else PanopticOptions(
            stuff_min_area=args.stuff_min_area)
        predictor = load_predictor(args.checkpoint, args.onnx, device=args.device,
                                   threads=args.threads, panoptic=panoptic)
    except (FileNotFoundError, ManifestError, ValueError, TypeError) as exc:
        logger.error("%s", exc)
        return 2
    logger.info("%d images, model %s (%s)", len(paths), predictor.info()["version"],
                predictor.backend_name)
    summary = predict_files(predictor, paths, Path(args.out), args.score_threshold,
                            args.mask_threshold, predictor.category_ids)
    json.dump(summary, sys.stdout)
    sys.stdout.write("\n")
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
