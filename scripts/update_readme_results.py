"""Rewrite the results block of README.md from the latest Kedro outputs.

Reads the newest version of coco_metrics, pq_metrics, cityscapes_metrics, training_history and
data_quality_report under data/08_reporting/<source_name>/, copies the newest figures into
docs/results/ and replaces the text between the results markers with a table and a
gallery. Without markers, the block is appended under a "## Results" heading. The block
depends only on the outputs, so a second run with the same outputs changes nothing.

    python scripts/update_readme_results.py [--project DIR] [--source-name NAME] [--readme PATH]
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
from pathlib import Path

import pandas as pd

logger = logging.getLogger(__name__)

START = "<!-- results:start -->"
END = "<!-- results:end -->"
REPORTING = Path("data/08_reporting")
FIRST_FIGURES = ("dataset_statistics.png", "training_curves.png")
# evaluation figures, by the start of their catalog name
EVALUATION_FIGURES = ("visualisation", "visualization", "dashboard", "performance", "worst",
                      "false_positive", "false_negative", "panoptic")
AP_COLUMNS = (("mAP", "mAP"), ("mAP_50", "mAP@50"), ("mAP_75", "mAP@75"))
IOU_TYPES = (("segm", "mask (segm)"), ("bbox", "box (bbox)"))


class ResultsError(RuntimeError):
    """The outputs or the README cannot give a results block."""


def latest_file(dataset: Path) -> tuple[Path, str | None] | None:
    """The newest saved file of a catalog dataset and its version, or None when absent.

    A Kedro-versioned dataset is a folder ``<name>/<version>/<name>``; versions are UTC
    timestamps, so the largest name is the newest. A plain file has no version.
    """
    if dataset.is_file():
        return dataset, None
    if not dataset.is_dir():
        return None
    versions = sorted(p.name for p in dataset.iterdir() if (p / dataset.name).is_file())
    return (dataset / versions[-1] / dataset.name, versions[-1]) if versions else None


def load_outputs(reporting: Path) -> dict:
    """coco_metrics, pq_metrics, data_quality_report (dicts), training_history (DataFrame)
    and the version each came from; a missing output is None (logged)."""
    outputs: dict = {"versions": {}}
    for name, reader in (("coco_metrics.json", _read_json), ("pq_metrics.json", _read_json),
                         ("cityscapes_metrics.json", _read_json),
                         ("data_quality_report.json", _read_json),
                         ("training_history.parquet", pd.read_parquet)):
        found = latest_file(reporting / name)
        key = name.split(".")[0]
        if found is None:
            logger.warning("%s: no saved version; its cells stay empty", reporting / name)
        outputs[key] = reader(found[0]) if found else None
        outputs["versions"][key] = found[1] if found else None
    if all(outputs[k] is None for k in outputs["versions"]):
        raise ResultsError(f"{reporting}: no coco_metrics, pq_metrics, training_history or "
                           "data_quality_report; run `kedro run` first")
    return outputs


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _number(value, digits: int = 3) -> str:
    """COCO writes -1 for "undefined" (no GT in that range): shown as a dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == -1:
        return "–"
    return f"{float(value):.{digits}f}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.2f} h"


def ap_table(coco: dict | None) -> list[str]:
    """Markdown rows: mask and box mAP, mAP@50, mAP@75 (dashes when not evaluated)."""
    header = "| | " + " | ".join(label for _, label in AP_COLUMNS) + " |"
    rows = [header, "| --- |" + " ---: |" * len(AP_COLUMNS)]
    for iou_type, label in IOU_TYPES:
        stats = (coco or {}).get(iou_type, {})
        rows.append(f"| {label} | " + " | ".join(_number(stats.get(key))
                                                  for key, _ in AP_COLUMNS) + " |")
    return rows


def training_summary(history: pd.DataFrame | None) -> tuple[str, str]:
    """(iterations, wall time) of the training history; the time column is seconds per
    iteration, so its sum is the training wall time without evaluation."""
    if history is None or len(history) == 0:
        return "–", "–"
    iterations = int(history["iteration"].max()) + 1 if "iteration" in history else len(history)
    seconds = float(history["time"].sum()) if "time" in history else float("nan")
    return str(iterations), "–" if math.isnan(seconds) else _duration(seconds)


def summary_table(outputs: dict) -> list[str]:
    """Markdown rows: PQ / SQ / RQ, Cityscapes-style AP / AP50, training iterations and
    time, images and instances."""
    pq = (outputs["pq_metrics"] or {}).get("all", {})
    quality = outputs["data_quality_report"] or {}
    iterations, wall_time = training_summary(outputs["training_history"])
    crowd = quality.get("crowd_instances")
    instances = str(quality.get("instances", "–")) + (f" ({crowd} crowd)" if crowd else "")
    city = outputs.get("cityscapes_metrics") or {}
    return [("| PQ | SQ | RQ | Cityscapes AP | Cityscapes AP50 | training iterations "
            "| training time | images | instances |"),
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            (f"| {_number(pq.get('pq'))} | {_number(pq.get('sq'))} | {_number(pq.get('rq'))} "
             f"| {_number(city.get('AP'))} | {_number(city.get('AP50'))} "
             f"| {iterations} | {wall_time} | {quality.get('images', '–')} | {instances} |")]


def figure_names(reporting: Path) -> list[str]:
    """The figure datasets to show: statistics and training curves, then evaluation figures."""
    present = sorted(p.name for p in reporting.glob("*.png"))
    evaluation = [n for n in present if n.startswith(EVALUATION_FIGURES)]
    return [n for n in FIRST_FIGURES if n in present] + evaluation


def copy_figures(reporting: Path, figures_dir: Path) -> list[Path]:
    """Copy the newest version of each figure into ``figures_dir``; returns the copies."""
    copies = []
    for name in figure_names(reporting):
        found = latest_file(reporting / name)
        if found is None:
            continue
        figures_dir.mkdir(parents=True, exist_ok=True)
        target = figures_dir / name
        if not target.exists() or target.read_bytes() != found[0].read_bytes():
            shutil.copyfile(found[0], target)
        copies.append(target)
    return copies


def gallery(figures: list[Path], readme_dir: Path) -> list[str]:
    """Markdown images linking the copied figures relative to the README."""
    lines = []
    for path in figures:
        link = Path(os.path.relpath(path, readme_dir)).as_posix()
        lines += [f"![{path.stem.replace('_', ' ')}]({link})", ""]
    return lines[:-1]


def results_block(outputs: dict, source_name: str, figures: list[Path],
                  readme_dir: Path) -> str:
    """The text between the markers (markers included)."""
    version = outputs["versions"].get("coco_metrics") or "unversioned"
    intro = (f"Latest outputs for source `{source_name}` (evaluation version `{version}`), "
             "written by `python scripts/update_readme_results.py` after `kedro run`.")
    lines = [START, "", intro, "", *ap_table(outputs["coco_metrics"]), "",
             *summary_table(outputs)]
    if figures:
        lines += ["", *gallery(figures, readme_dir)]
    return "\n".join([*lines, "", END])


def replace_block(text: str, block: str) -> str:
    """``text`` with the marked block replaced, or the block appended under "## Results"."""
    starts, ends = text.count(START), text.count(END)
    if starts == ends == 0:
        head = text.rstrip("\n")
        return (head + "\n\n" if head else "") + "## Results\n\n" + block + "\n"
    if starts != 1 or ends != 1 or text.index(START) > text.index(END):
        raise ResultsError(f"expected one {START} before one {END}; found {starts} start "
                           f"and {ends} end marker(s)")
    head, rest = text.split(START, 1)
    return head + block + rest.split(END, 1)[1]


def update_readme(project: Path, source_name: str, readme: Path,
                  figures_dir: Path) -> bool:
    """Rewrite the results block of ``readme``; True when the file changed."""
    reporting = project / REPORTING / source_name
    if not reporting.is_dir():
        raise ResultsError(f"{reporting}: no outputs for source {source_name!r}; "
                           "run `kedro run` first")
    outputs = load_outputs(reporting)
    figures = copy_figures(reporting, figures_dir)
    old = readme.read_text(encoding="utf-8") if readme.exists() else ""
    new = replace_block(old, results_block(outputs, source_name, figures, readme.parent))
    if new != old:
        readme.write_text(new, encoding="utf-8")
    logger.info("%s %s (%d figures in %s)", "updated" if new != old else "unchanged",
                readme, len(figures), figures_dir)
    return new != old


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=Path.cwd(),
                        help="Kedro project folder holding data/08_reporting (default: .)")
    parser.add_argument("--source-name", default="synthetic",
                        help="globals source_name whose outputs are reported "
                             "(default: synthetic)")
    parser.add_argument("--readme", type=Path, default=None,
                        help="README to update (default: PROJECT/README.md)")
    parser.add_argument("--figures-dir", type=Path, default=None,
                        help="where the figures are copied (default: PROJECT/docs/results)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    readme = args.readme or args.project / "README.md"
    figures_dir = args.figures_dir or args.project / "docs" / "results"
    try:
        update_readme(args.project, args.source_name, readme, figures_dir)
    except ResultsError as exc:
        logger.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
