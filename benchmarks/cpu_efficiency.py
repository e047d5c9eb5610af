"""Accuracy per CPU-minute: mask AP after fixed training budgets, old default against new.

Each configuration trains on the default synthetic data (99 train / 21 val images, the
`kedro run` split) for fixed wall-clock budgets on the same thread count, then is evaluated
on the val split through the project's inference path and COCO evaluation, and timed at
batch 1 (eager torch and ONNX Runtime). Every (configuration, budget, seed) trains in a
fresh process.

A budget is ``training.time_budget_min``: the loop stops at the first step end after that
many minutes of steps (data loading, augmentation, forward, backward, optimizer) and the
schedule follows the elapsed share of the budget (a cosine ends with it; multistep
milestones fire at their fraction of the run); warmup stays in steps. ``max_iters`` is only
a cap. The table reports the steps taken and the wall of the whole `fit` call (dataset and
model set-up included). In-training validation and model selection are off for every
configuration (they would spend the budget on evaluation), so the final weights are
evaluated.

Configurations:
- ``old``: the default training configuration before the CPU-efficiency work (frozen here);
- ``new``: ``conf/base/parameters_training.yml`` as it is in the working tree;
- ``--variant NAME BASE key=value ...``: an ablation, BASE (old or new) with dotted
  training keys on top (values parsed as YAML), e.g.
  ``--variant adamw old optimizer.name=adamw optimizer.lr=0.002 scheduler.name=cosine``.

    python benchmarks/cpu_efficiency.py [--budgets 3.75 7.5 15] [--seeds 0 1]
        [--seeds-at 15=0] [--old-seeds 0] [--configs old new] [--threads 2]
        [--variant ...] [--coco ../shared/data/coco128] [--loss-plot loss.png]
        [--json out.json]

Target (the new default, mean of two seeds): mask AP >= 0.72 after 7.5 min and >= 0.60
after 3.75 min; ONNX latency <= 35 ms per image; images/s of each printed as a ratio to old.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TRAINING_YML = REPO / "conf/base/parameters_training.yml"

# the default training configuration before this benchmark's work: maskrcnn_tiny at 192-256
# px, batch 4, SGD 0.02 with two steps of 0.1 at 75 % and 92 % of the run, 50 warmup steps,
# 300 proposals per image into an ROI sample of 128, no weight average
OLD = {
    "model": {"name": "maskrcnn_tiny", "weights": None, "min_size": 192, "max_size": 256},
    "batch_size": 4,
    "optimizer": {"name": "sgd", "lr": 0.02, "momentum": 0.9, "weight_decay": 0.0001},
    "scheduler": {"name": "multistep", "milestones": [450, 550], "gamma": 0.1},
    "max_iters": 600, "warmup_iters": 50, "warmup_factor": 0.01, "clip_grad_norm": 10.0,
    "augmentation": {"preset": "light"},
    "families": {"maskrcnn": {"rpn_post_nms_top_n_train": 300, "box_batch_size_per_image": 128}},
    "ema": {"decay": None},
}
# the same for every configuration: no evaluation inside the budget, nothing written that
# the benchmark does not read
RUN = {"selection": {"every_epochs": 0}, "val_max_images": 0, "checkpoint_every": 0,
       "keep_checkpoints": 1, "log_model_to_mlflow": False, "progress_bar": False,
       "log_every": 0, "tensorboard": False, "device": "cpu", "deterministic": True}


def merged(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(
            out.get(key), dict) else value
    return out


def dotted(pairs: list[str]) -> dict:
    """``["optimizer.lr=0.002", ...]`` -> nested dict, values parsed as YAML."""
    out: dict = {}
    for pair in pairs:
        key, _, text = pair.partition("=")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(text)
    return out


def base_training() -> dict:
    """The working tree's ``training`` block (families' defaults included)."""
    return yaml.safe_load(TRAINING_YML.read_text())["training"]


def configurations(names: list[str], variants: list[list[str]]) -> dict[str, dict]:
    new = base_training()
    known = {"old": merged(new, OLD), "new": new}
    out = {name: known[name] for name in names}
    for name, base, *pairs in variants:
        out[name] = merged(known[base], dotted(pairs))
    return out


# max_iters of a budgeted run: a cap no budget here reaches
ITERATION_CAP = 100_000


def budgeted(training: dict, minutes: float) -> dict:
    """``training`` for a time budget: multistep milestones kept at their fraction of the
    configured run (of the cap, which the time budget maps onto the elapsed share)."""
    scheduler = dict(training.get("scheduler") or {})
    if scheduler.get("name", "multistep") == "multistep":
        total = float(training.get("max_iters", 600))
        scheduler["milestones"] = [round(m / total * ITERATION_CAP)
                                   for m in scheduler.get("milestones", [450, 550])]
    return {**training, "max_iters": ITERATION_CAP, "scheduler": scheduler,
            "time_budget_min": float(minutes)}


# --------------------------------------------------------------------------- one run
def _tables(root: str, coco: str | None = None):
    """The split tables: the default synthetic data generated under ``root``, or the COCO
    instances json + images of ``coco`` (``annotations/instances_train2017.json`` and
    ``train2017/``, the layout of ../shared/data/coco128) read in place."""
    from instseg_pipeline.pipelines.ingestion.nodes import ingest_source, split_images
    from instseg_pipeline.pipelines.synthetic.nodes import generate_synthetic_data

    if coco:
        source = {"type": "coco", "root": coco, "images": "train2017",
                  "annotations": "annotations/instances_train2017.json"}
    else:
        source = {"type": "synthetic", "root": root}
        generate_synthetic_data(source)
    images, instances, categories, stuff, _ = ingest_source(source)
    ingestion = yaml.safe_load((REPO / "conf/base/parameters_ingestion.yml").read_text())
    return split_images(images, ingestion["ingestion"]), instances, categories, stuff


def _fit(tables, root: str, training: dict, minutes: float, checkpoints: str):
    from instseg_pipeline.engine.config import TrainingConfig
    from instseg_pipeline.engine.fit import fit

    params = budgeted(training, minutes)
    params["checkpoint_dir"] = tempfile.mkdtemp(dir=checkpoints)
    images, instances, categories, stuff = tables
    started = time.perf_counter()
    result = fit(images, instances, categories, root, TrainingConfig.from_params(params),
                 stuff_segments=stuff)
    return result, time.perf_counter() - started


def one_run(job: dict) -> dict:
    """Train for the budget, evaluate and time; one result row."""
    import torch

    from instseg_pipeline.comparison.compare import evaluate, load_arrays, speed_rows
    from instseg_pipeline.comparison.speed import measure_speed
    from instseg_pipeline.evaluation.config import EvaluationConfig
    from instseg_pipeline.models import load_model

    torch.set_num_threads(job["threads"])
    training = merged(merged(job["training"], RUN), {"seed": job["seed"],
                                                     "threads": job["threads"]})
    tables = _tables(job["root"], job.get("coco"))
    root = job.get("coco") or job["root"]
    with tempfile.TemporaryDirectory() as checkpoints:
        result, wall = _fit(tables, root, training, job["budget_min"], checkpoints)
    saved, iters = result["model"], int(result["model"]["iterations"])
    steps = float(result["history"]["time"].sum())
    network = load_model(saved["config"], saved["state_dict"]).eval()
    images, instances, categories, _ = tables
    evaluation = EvaluationConfig.from_params(
        yaml.safe_load((REPO / "conf/base/parameters_evaluation.yml").read_text())["evaluation"])
    scores = evaluate(network, images, instances, categories, root, evaluation)
    arrays = load_arrays(speed_rows(images, "val", 8), root)
    speed = measure_speed(network, arrays, job["threads"], warmup=2, repeats=2, onnx=True)
    batch = int(training.get("batch_size", 4))
    return {"config": job["name"], "budget_min": job["budget_min"], "seed": job["seed"],
            "iters": iters, "train_wall_min": wall / 60, "sec_per_iter": wall / iters,
            "train_img_per_s": iters * batch / wall, "step_img_per_s": iters * batch / steps, "mask_AP": scores["mAP"],
            "AP50": scores["mAP_50"], "AP75": scores["mAP_75"], "box_AP": scores["box_mAP"],
            "eager_ms": 1000 / speed["fps"] if speed["fps"] else float("nan"),
            "onnx_ms": 1000 / speed["fps_onnx"] if speed["fps_onnx"] == speed["fps_onnx"]
            and speed["fps_onnx"] else float("nan"),
            "curve": {"minutes": (result["history"]["time"].cumsum() / 60).round(4).tolist(),
                      "loss": result["history"]["loss"].round(5).tolist()}}


def loss_plot(rows: list[dict], path: str) -> None:
    """Training loss against training minutes, one line per (config, seed) of the longest
    budget (a running mean over 25 steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    longest = max(r["budget_min"] for r in rows)
    figure, axes = plt.subplots(figsize=(7, 4))
    for row in rows:
        if row["budget_min"] == longest:
            loss = pd.Series(row["curve"]["loss"]).rolling(25, min_periods=1).mean()
            axes.plot(row["curve"]["minutes"], loss,
                      label=f"{row['config']} seed {row['seed']} (mask AP {row['mask_AP']:.3f})")
    axes.set(xlabel="training minutes", ylabel="training loss (mean of 25 steps)",
             title=f"Training loss at equal time ({longest:g} min budget)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


# --------------------------------------------------------------------------- table
def _mean(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if r[key] == r[key]]
    return statistics.fmean(values) if values else float("nan")


def table(rows: list[dict]) -> str:
    head = ("| config | budget min | seeds | iters | train wall min | train img/s | img/s "
            "vs old | mask AP | AP50 | AP75 | box AP | eager ms | ONNX ms |")
    lines = [head, "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    old_speed = {r["budget_min"]: r["train_img_per_s"] for r in rows if r["config"] == "old"}
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["config"], row["budget_min"]), []).append(row)
    for (config, budget), group in groups.items():
        seeds = " / ".join(f"{r['mask_AP']:.3f}" for r in group)
        speed = _mean(group, "train_img_per_s")
        ratio = speed / old_speed[budget] if budget in old_speed else float("nan")
        lines.append(
            f"| {config} | {budget:g} | {seeds} | {_mean(group, 'iters'):.0f} | "
            f"{_mean(group, 'train_wall_min'):.2f} | {speed:.2f} | {ratio:.2f} | "
            f"{_mean(group, 'mask_AP'):.3f} | {_mean(group, 'AP50'):.3f} | "
            f"{_mean(group, 'AP75'):.3f} | {_mean(group, 'box_AP'):.3f} | "
            f"{_mean(group, 'eager_ms'):.1f} | {_mean(group, 'onnx_ms'):.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[3.75, 7.5, 15.0],
                        help="training minutes (default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--seeds-at", nargs="+", default=[], metavar="BUDGET=S[,S]",
                        help="other seeds at one budget, e.g. 15=0 (one seed for the "
                             "longest budget)")
    parser.add_argument("--old-seeds", type=int, nargs="+",
                        help="seeds of the old default (default: --seeds / --seeds-at)")
    parser.add_argument("--configs", nargs="*", default=["old", "new"],
                        help="old and/or new (default: both)")
    parser.add_argument("--variant", nargs="+", action="append", default=[],
                        metavar="NAME BASE key=value",
                        help="an ablation: BASE (old | new) with dotted training keys")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--coco", metavar="ROOT",
                        help="train and evaluate on this COCO folder (annotations/"
                             "instances_train2017.json + train2017/, split as ingestion "
                             "does) instead of the synthetic data, e.g. ../shared/data/coco128")
    parser.add_argument("--loss-plot", metavar="PNG",
                        help="also draw the training loss against time (longest budget)")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(json.loads(args.one))))
        return
    coco = str(Path(args.coco).resolve()) if args.coco else None
    configs = configurations(args.configs, args.variant)
    seeds_at = {float(b): [int(s) for s in text.split(",")]
                for b, _, text in (item.partition("=") for item in args.seeds_at)}
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "INSTSEG_MLFLOW": "off"}
    with tempfile.TemporaryDirectory() as data:
        for budget in args.budgets:
            for name, training in configs.items():
                seeds = seeds_at.get(budget, args.seeds)
                for seed in (args.old_seeds if name == "old" and args.old_seeds else seeds):
                    job = {"name": name, "training": training, "budget_min": budget,
                           "seed": seed, "threads": args.threads, "root": data, "coco": coco}
                    done = subprocess.run([sys.executable, __file__, "--one", json.dumps(job)],
                                          capture_output=True, text=True, env=env, check=False)
                    if done.returncode:
                        sys.exit(f"{name} budget {budget} seed {seed} failed:\n{done.stderr}")
                    row = json.loads(done.stdout.strip().splitlines()[-1])
                    rows.append(row)
                    print(f"{name} {budget:g} min seed {seed}: {row['iters']} iterations in "
                          f"{row['train_wall_min']:.2f} min, mask AP {row['mask_AP']:.3f}",
                          file=sys.stderr, flush=True)
    print(table(rows))
    if args.loss_plot:
        loss_plot(rows, args.loss_plot)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
