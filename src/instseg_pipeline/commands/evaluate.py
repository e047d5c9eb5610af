"""`instseg-eval`: COCO AP, panoptic quality and Cityscapes AP from files, printed as one JSON object."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from instseg_pipeline.evaluation import MetricInputError

logger = logging.getLogger(__name__)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="instseg-eval",
        description="Evaluate instance segmentation results the way papers do. "
                    "Prints one JSON object on stdout; errors go to stderr with exit code 2.")
    commands = parser.add_subparsers(dest="command", required=True)

    coco = commands.add_parser(
        "coco", help="COCO AP/AR (12 standard numbers) of a results json against a GT json.",
        description="COCO evaluation of detection (bbox) or segmentation (segm) results. "
                    "Prints mAP, mAP_50, mAP_75, mAP_small, mAP_medium, mAP_large, AR_1, "
                    "AR_10, AR_100, AR_small, AR_medium, AR_large.")
    coco.add_argument("--gt", required=True, help="COCO instances ground-truth json")
    coco.add_argument("--results", required=True,
                      help="COCO results json (a list of {image_id, category_id, score, "
                           "bbox or segmentation})")
    coco.add_argument("--iou-type", required=True, choices=["segm", "bbox"],
                      help="segm: mask IoU; bbox: box IoU")
    coco.add_argument("--backend", default="faster-coco-eval",
                      choices=["pycocotools", "faster-coco-eval"],
                      help="pycocotools is the reference; faster-coco-eval gives identical "
                           "numbers faster (default: %(default)s)")

    pan = commands.add_parser(
        "panoptic", help="Panoptic quality PQ/SQ/RQ from COCO panoptic json + PNG folders.",
        description="Panoptic quality with the COCO panoptic task's rules (IoU > 0.5 "
                    "matching, void and crowd handling). Prints {all, things, stuff} with "
                    "pq, sq, rq (fractions in [0, 1]) and n (number of categories).")
    pan.add_argument("--gt-json", required=True, help="COCO panoptic ground-truth json")
    pan.add_argument("--gt-folder", required=True, help="folder of ground-truth PNGs")
    pan.add_argument("--pred-json", required=True, help="COCO panoptic prediction json")
    pan.add_argument("--pred-folder", required=True, help="folder of prediction PNGs")

    city = commands.add_parser(
        "cityscapes", help="Cityscapes instance-level AP and AP50 (official rules).",
        description="Cityscapes instance-level AP over IoU 0.5:0.95 and AP at 0.5 for the 8 "
                    "evaluated classes: ground-truth regions under 100 px and group regions "
                    "are ignored, as are predictions mostly on void. Prints AP, AP50 and "
                    "per_class (null where a class has no ground truth).")
    city.add_argument("--gt-folder", required=True,
                      help="folder searched for *_gtFine_instanceIds.png (e.g. gtFine/val)")
    city.add_argument("--results", required=True,
                      help="folder of one {city}_{seq}_{frame}*.txt per image, each line "
                           "'mask.png label_id score' with the mask path relative to the txt")
    city.add_argument("--allow-missing", action="store_true",
                      help="treat an image without a prediction file as predicting nothing "
                           "(default: an error)")
    return parser


def _run(args: argparse.Namespace) -> dict:
    if args.command == "coco":
        from instseg_pipeline.evaluation.coco import evaluate_files

        return evaluate_files(args.gt, args.results, iou_type=args.iou_type,
                              backend=args.backend)
    if args.command == "cityscapes":
        from instseg_pipeline.evaluation.cityscapes import evaluate_folders

        return evaluate_folders(args.gt_folder, args.results, allow_missing=args.allow_missing)
    from instseg_pipeline.evaluation.panoptic import pq_from_files

    return pq_from_files(args.gt_json, args.gt_folder, args.pred_json, args.pred_folder)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = _build_parser().parse_args(argv)
    try:
        result = _run(args)
    except MetricInputError as exc:
        print(f"instseg-eval {args.command}: error: {exc}", file=sys.stderr)
        return 2
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
