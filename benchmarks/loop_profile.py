"""Where a training step's time goes, and what the loop-level options buy, on this CPU.

Trains ``maskrcnn_tiny`` (the working tree's ``conf/base`` training block, or the frozen
old default with ``--config old``) on the default synthetic data for a few steps after a
warm-up, timing each part of the step with forward hooks and wrapped functions (on CPU every
op is synchronous, so wall time per part is exact up to the hook overhead):

- data: the loader's ``next`` (RLE decode, augmentation, target building, collate);
- transform: resize, normalise and batch (GeneralizedRCNNTransform);
- backbone + FPN, RPN (of which anchor matching, box encoding, sampling and the RPN
  losses: "RPN targets"),
  ROI sampling (proposal matching and sampling), box head (ROI align + head + predictor),
  mask head (ROI align + head + predictor), mask targets (ground-truth masks cropped and
  resized to the ROIs), losses not counted elsewhere;
- backward, optimizer step (clipping included).

Then the same steps under each loop option, in a fresh process each (``--modes``):
``eager`` (the baseline), ``channels_last`` (the weights in NHWC memory format, so the
convolutions run channels-last from the first one on),
``compile`` (``torch.compile`` of the backbone + FPN; its compile time is reported apart).
Prints two tables: the breakdown, and images/s of each mode as a ratio to eager.

    python benchmarks/loop_profile.py [--steps 20] [--warmup 5] [--threads 2]
        [--config new|old] [--modes eager channels_last compile] [--mode-timeout 300]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import cpu_efficiency  # the same data, configurations and merge rules

PARTS = ["data", "transform", "backbone + FPN", "RPN (without targets)", "RPN targets",
         "ROI sampling", "box head", "mask head", "mask targets", "losses and rest of forward",
         "backward", "optimizer step"]


class Clock:
    """Seconds per named part, accumulated while ``on``."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.on = False

    def hook(self, module, name: str) -> None:
        starts: list[float] = []

        def before(*_):
            starts.append(time.perf_counter())

        def after(*_):
            if self.on:
                self.seconds[name] += time.perf_counter() - starts.pop()
            else:
                starts.pop()

        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)

    def wrap(self, owner, attribute: str, name: str) -> None:
        inner = getattr(owner, attribute)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                if self.on:
                    self.seconds[name] += time.perf_counter() - start

        setattr(owner, attribute, timed)


def _setup(job: dict):
    import torch

    from instseg_pipeline.engine.config import TrainingConfig
    from instseg_pipeline.engine.fit import build_datasets
    from instseg_pipeline.engine.loop import build_optimizer
    from instseg_pipeline.models import build_model, family_params
    from instseg_pipeline.torchdata.dataset import aspect_ratio_group_ids, build_train_loader

    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    training = cpu_efficiency.merged(job["training"], cpu_efficiency.RUN)
    config = TrainingConfig.from_params({**training, "checkpoint_dir": tempfile.mkdtemp()})
    images, instances, categories, stuff = cpu_efficiency._tables(job["root"])
    train_set, _ = build_datasets(images, instances, categories, job["root"], config, stuff)
    model = build_model(family_params(config.model, config.families), len(train_set.mapping) + 1)
    model.train()
    optimizer = build_optimizer(model, config.optimizer)
    groups = aspect_ratio_group_ids(train_set.images) if config.group_aspect_ratio else None

    def batches():
        epoch = 0
        while True:
            yield from build_train_loader(train_set, config.batch_size, config.num_workers,
                                          config.seed, epoch, False, groups)
            epoch += 1

    return model, optimizer, batches(), config


def _instrument(model, clock: Clock) -> None:
    from torchvision.models.detection import roi_heads as roi_module

    clock.hook(model.transform, "transform")
    clock.hook(model.backbone, "backbone + FPN")
    clock.hook(model.rpn, "RPN")
    clock.wrap(model.rpn, "assign_targets_to_anchors", "RPN targets")
    clock.wrap(model.rpn.box_coder, "encode", "RPN targets")
    clock.wrap(model.rpn, "compute_loss", "RPN targets")
    heads = model.roi_heads
    clock.wrap(heads, "select_training_samples", "ROI sampling")
    for part in ("box_roi_pool", "box_head", "box_predictor"):
        clock.hook(getattr(heads, part), "box head")
    for part in ("mask_roi_pool", "mask_head", "mask_predictor"):
        clock.hook(getattr(heads, part), "mask head")
    clock.wrap(roi_module, "project_masks_on_boxes", "mask targets")


def profile(job: dict) -> dict:
    """One mode: per-part seconds per step and images/s over ``steps`` timed steps."""
    import torch

    model, optimizer, batches, config = _setup(job)
    mode = job["mode"]
    compile_s = 0.0
    if mode == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    clock = Clock()
    _instrument(model, clock)
    if mode == "compile":
        model.backbone = torch.compile(model.backbone, dynamic=True)

    def step() -> None:
        start = time.perf_counter()
        images, targets = next(batches)  # [3, H, W] each: the model's transform batches them
        clock.seconds["data"] += (time.perf_counter() - start) if clock.on else 0.0
        start = time.perf_counter()
        losses = model(images, targets)
        loss = sum(losses.values())
        if clock.on:
            clock.seconds["forward"] += time.perf_counter() - start
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clock.on:
            clock.seconds["backward"] += time.perf_counter() - start
        start = time.perf_counter()
        if config.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad_norm)
        optimizer.step()
        if clock.on:
            clock.seconds["optimizer step"] += time.perf_counter() - start

    started = time.perf_counter()
    step()  # the first step (compilation, allocator warm-up)
    compile_s = time.perf_counter() - started
    for _ in range(job["warmup"] - 1):
        step()
    clock.on = True
    started = time.perf_counter()
    for _ in range(job["steps"]):
        step()
    wall = time.perf_counter() - started
    seconds = dict(clock.seconds)
    named = sum(seconds.get(k, 0.0) for k in ("transform", "backbone + FPN", "RPN",
                                               "ROI sampling", "box head", "mask head",
                                               "mask targets"))
    seconds["RPN (without targets)"] = seconds.pop("RPN", 0.0) - seconds.get("RPN targets", 0.0)
    seconds["losses and rest of forward"] = seconds.pop("forward", 0.0) - named
    return {"mode": mode, "steps": job["steps"], "wall_s": wall,
            "img_per_s": job["steps"] * config.batch_size / wall, "first_step_s": compile_s,
            "ms_per_step": {k: 1000 * v / job["steps"] for k, v in seconds.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--config", choices=["new", "old"], default="new",
                        help="new: conf/base; old: the default before the CPU work")
    parser.add_argument("--modes", nargs="+", default=["eager", "channels_last", "compile"],
                        choices=["eager", "channels_last", "compile"])
    parser.add_argument("--mode-timeout", type=float, default=300,
                        help="seconds a mode may take, compilation included (default 300)")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(profile(json.loads(args.one))))
        return
    training = cpu_efficiency.configurations([args.config], [])[args.config]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "INSTSEG_MLFLOW": "off"}
    rows = []
    with tempfile.TemporaryDirectory() as data:
        for mode in args.modes:
            job = {"mode": mode, "training": training, "root": data, "steps": args.steps,
                   "warmup": max(1, args.warmup), "threads": args.threads}
            try:
                done = subprocess.run([sys.executable, __file__, "--one", json.dumps(job)],
                                      capture_output=True, text=True, env=env, check=False,
                                      timeout=args.mode_timeout)
            except subprocess.TimeoutExpired:
                print(f"{mode}: no result within {args.mode_timeout} s", file=sys.stderr)
                continue
            if done.returncode:
                print(f"{mode} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"{mode}: {rows[-1]['img_per_s']:.2f} images/s", file=sys.stderr, flush=True)
    if not rows:
        sys.exit("no mode gave a result")
    base = rows[0]
    total = sum(base["ms_per_step"].values())
    print(f"Step breakdown ({base['mode']}, {args.config} config, {args.steps} steps, "
          f"{args.threads} threads)\n")
    print("| part | ms / step | share |\n|---|---:|---:|")
    for part in PARTS:
        ms = base["ms_per_step"].get(part, 0.0)
        print(f"| {part} | {ms:.1f} | {ms / total:.0%} |")
    print(f"| total | {total:.1f} | 100% |\n")
    print("| mode | images/s | vs eager | first step s |\n|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['mode']} | {row['img_per_s']:.2f} | "
              f"{row['img_per_s'] / base['img_per_s']:.2f} | {row['first_step_s']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
