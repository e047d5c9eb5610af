"""`instseg-eval`: COCO AP, panoptic quality and Cityscapes AP from files.

Prints a readable table by default and one JSON object with ``--json``. Imports no torch,
mlflow or Kedro: the metrics modules it loads are numpy / pycocotools only.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from instseg_pipeline.evaluation import MetricInputError

logger = logging.getLogger(__name__)

# the layout of a folder saved by the panoptic_predictions dataset
# (kedro_ext.datasets.PanopticDataset; no Kedro import here)
PRED_DIR_JSON, PRED_DIR_PNGS = "panoptic.json", "panoptic"


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="instseg-eval",
        description="Evaluate instance segmentation results the way papers do. "
                    "Prints a table on stdout (one JSON object with --json); errors go to "
                    "stderr with exit code 2.")
    json_flag = argparse.ArgumentParser(add_help=False)
    json_flag.add_argument("--json", action="store_true",
                           help="print one JSON object instead of the table")
    commands = parser.add_subparsers(dest="command", required=True)

    coco = commands.add_parser(
        "coco", parents=[json_flag], help="COCO AP/AR (12 standard numbers) of a results json against a GT json.",
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
        "panoptic", parents=[json_flag], help="Panoptic quality PQ/SQ/RQ from COCO panoptic json + PNG folders.",
        description="Panoptic quality with the COCO panoptic task's rules (IoU > 0.5 "
                    "matching, void and crowd handling). Prints {all, things, stuff} with "
                    "pq, sq, rq (fractions in [0, 1]) and n (number of categories).")
    pan.add_argument("--gt-json", help="COCO panoptic ground-truth json")
    pan.add_argument("--gt-folder", help="folder of ground-truth PNGs")
    pan.add_argument("--gt-dir",
                     help="a saved panoptic_ground_truth version (the folder holding "
                          f"{PRED_DIR_JSON} and {PRED_DIR_PNGS}/: what the pipeline's "
                          "pq_metrics scored against), instead of --gt-json and --gt-folder")
    pan.add_argument("--pred-json", help="COCO panoptic prediction json")
    pan.add_argument("--pred-folder", help="folder of prediction PNGs")
    pan.add_argument("--pred-dir",
                     help="a saved panoptic_predictions version (the folder holding "
                          f"{PRED_DIR_JSON} and {PRED_DIR_PNGS}/), instead of --pred-json "
                          "and --pred-folder")

    city = commands.add_parser(
        "cityscapes", parents=[json_flag], help="Cityscapes instance-level AP and AP50 (official rules).",
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

    return pq_from_files(*_panoptic_files(args.gt_dir, args.gt_json, args.gt_folder, "gt"),
                         *_panoptic_files(args.pred_dir, args.pred_json, args.pred_folder,
                                          "pred"))


def _panoptic_files(folder: str | None, json_path: str | None, pngs: str | None,
                    side: str) -> tuple[Path, Path]:
    """(json, PNG folder) of one side of `panoptic`: --{side}-dir, or both --{side}-json and
    --{side}-folder."""
    if folder is not None:
        if json_path is not None or pngs is not None:
            raise UsageError(f"--{side}-dir replaces --{side}-json and --{side}-folder; give "
                             "one way")
        return Path(folder) / PRED_DIR_JSON, Path(folder) / PRED_DIR_PNGS
    if json_path is None or pngs is None:
        raise UsageError(f"give --{side}-json and --{side}-folder, or --{side}-dir")
    return Path(json_path), Path(pngs)


class UsageError(MetricInputError):
    """The command line names the inputs in a way the command cannot use."""


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = _build_parser().parse_args(argv)
    try:
        result = _run(args)
    except MetricInputError as exc:
        print(f"instseg-eval {args.command}: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(TABLES[args.command](result, args) + "\n")
    return 0


# --- tables -------------------------------------------------------------------------------------

# what each of the 12 COCO stats averages over, in pycocotools' summary order
COCO_STATS = (("mAP", "AP", "0.50:0.95", "all", 100), ("mAP_50", "AP", "0.50", "all", 100),
              ("mAP_75", "AP", "0.75", "all", 100),
              ("mAP_small", "AP", "0.50:0.95", "small", 100),
              ("mAP_medium", "AP", "0.50:0.95", "medium", 100),
              ("mAP_large", "AP", "0.50:0.95", "large", 100),
              ("AR_1", "AR", "0.50:0.95", "all", 1), ("AR_10", "AR", "0.50:0.95", "all", 10),
              ("AR_100", "AR", "0.50:0.95", "all", 100),
              ("AR_small", "AR", "0.50:0.95", "small", 100),
              ("AR_medium", "AR", "0.50:0.95", "medium", 100),
              ("AR_large", "AR", "0.50:0.95", "large", 100))
MISSING = "n/a"  # pycocotools' -1 (no ground truth in that area range) and Cityscapes' null


def _number(value) -> str:
    return MISSING if value is None or value < 0 else f"{value:.4f}"


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Text columns under a header rule: names left-aligned, numbers right-aligned."""
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    lines = []
    for row in [header, *rows]:
        cells = [str(c).ljust(w) if i == 0 else str(c).rjust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def coco_table(stats: dict, args: argparse.Namespace) -> str:
    """The 12 stats of one IoU type, each with the IoU range, area range and max detections."""
    rows = [[name, kind, iou, area, str(dets), _number(stats[name])]
            for name, kind, iou, area, dets in COCO_STATS]
    title = f"COCO {args.iou_type} ({'mask' if args.iou_type == 'segm' else 'box'} IoU)"
    return title + "\n" + format_table(["stat", "kind", "IoU", "area", "maxDets", "value"],
                                        rows)


def panoptic_table(result: dict, args: argparse.Namespace) -> str:
    """PQ, SQ and RQ (fractions) per group: all, things, stuff; n = number of categories."""
    rows = [[group, _number(values["pq"]), _number(values["sq"]), _number(values["rq"]),
             str(values["n"])] for group, values in result.items()]
    return "Panoptic quality\n" + format_table(["group", "PQ", "SQ", "RQ", "n"], rows)


def cityscapes_table(result: dict, args: argparse.Namespace) -> str:
    """AP and AP50 per evaluated class, then the mean over classes."""
    rows = [[c["name"], _number(c["AP"]), _number(c["AP50"])] for c in result["per_class"]]
    rows.append(["mean", _number(result["AP"]), _number(result["AP50"])])
    return (f"Cityscapes instance AP ({result['images']} images)\n"
            + format_table(["class", "AP", "AP50"], rows))


TABLES = {"coco": coco_table, "panoptic": panoptic_table, "cityscapes": cityscapes_table}


if __name__ == "__main__":
    sys.exit(main())
