"""Cost of live MLflow logging during training: the same tiny training with and without it.

Trains maskrcnn_tiny through `engine.fit.fit` on synthetic images, --rounds times each way,
alternating (off, on, on, off, ...) so that a busy machine weighs on both alike; "on" logs
to a fresh run of a temporary sqlite store with `kedro_ext.tracking.LiveMetrics` every
--log-every steps. Prints the wall time of each training, the median of each way, their
ratio, the same for the process's CPU time (the sending thread included; steadier than
wall time on a shared machine), and the time the training loop spent inside the live
logger's calls (its share of the "on" runs).
Target: overhead <= 2%.

    python benchmarks/live_tracking.py [--iters 60] [--log-every 20] [--rounds 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


class TimedLiveMetrics:
    """A `LiveMetrics` that adds up the seconds spent in its calls."""

    def __init__(self, live):
        self.live, self.seconds = live, 0.0

    def __call__(self, event: str, info: dict) -> None:
        start = time.perf_counter()
        self.live(event, info)
        self.seconds += time.perf_counter() - start


def _tables(root: Path):
    from instseg_pipeline.pipelines.ingestion.nodes import ingest_source
    from instseg_pipeline.pipelines.synthetic.nodes import generate_synthetic_data

    source = {"type": "synthetic", "root": str(root),
              "synthetic": {"num_images": 8, "min_size": 96, "max_size": 128}}
    generate_synthetic_data(source)
    images, instances, categories, *_ = ingest_source(source)
    return images.assign(split="train"), instances, categories, str(root)


def _config(folder: Path, args):
    from instseg_pipeline.engine.config import TrainingConfig

    return TrainingConfig.from_params({
        "device": "cpu", "threads": args.threads, "progress_bar": False, "max_iters": args.iters,
        "batch_size": 2, "warmup_iters": 5, "log_every": args.log_every, "checkpoint_every": 0,
        "checkpoint_dir": str(folder / "ckpt"), "val_max_images": 0,
        "selection": {"every_epochs": 0}, "scheduler": {"name": "constant"},
        "model": {"name": "maskrcnn_tiny", "min_size": 96, "max_size": 128}})


def _train(tables, config, live) -> tuple[float, float]:
    """Wall and CPU seconds (this process, the logger's thread included) of one training."""
    from instseg_pipeline.engine.fit import fit

    start, cpu = time.perf_counter(), time.process_time()
    fit(*tables, config, callbacks=[live] if live else [])
    if live is not None:
        live.live.flush(wait=True)  # already done at train_end; counts the sending in
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    from mlflow.tracking import MlflowClient

    from instseg_pipeline.kedro_ext.tracking import LiveMetrics

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tables, config = _tables(folder / "data"), _config(folder, args)
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        client = MlflowClient(uri)
        experiment = client.create_experiment("live-tracking-benchmark")
        _train(tables, config, None)  # warm-up: imports, allocator, caches
        times, cpus, logged, inside = {"off": [], "on": []}, {"off": [], "on": []}, 0, []
        for index in range(args.rounds * 2):
            mode = ("off", "on", "on", "off")[index % 4]
            live = None
            if mode == "on":
                run_id = client.create_run(experiment).info.run_id
                live = TimedLiveMetrics(LiveMetrics(run_id, uri, args.log_every))
            wall, cpu = _train(tables, config, live)
            times[mode].append(wall)
            cpus[mode].append(cpu)
            if live is not None:
                logged += live.live.logged
                inside.append(live.seconds / wall)
            print(f"run {index + 1}: live logging {mode:3s} {wall:7.2f} s wall {cpu:7.2f} s CPU")
    print(f"\n{args.iters} iterations, log_every {args.log_every}, {args.threads} thread(s)")
    print(f"{'':28s}{'wall s':>10s}{'CPU s':>10s}  (medians)")
    for mode in ("off", "on"):
        print(f"{'live logging ' + mode:28s}{statistics.median(times[mode]):10.2f}"
              f"{statistics.median(cpus[mode]):10.2f}")
    ratios = [statistics.median(t["on"]) / statistics.median(t["off"]) for t in (times, cpus)]
    print(f"{'ratio on / off':28s}{ratios[0]:10.3f}{ratios[1]:10.3f}")
    print(f"{'time inside the logger':28s}{100 * statistics.median(inside):9.2f}% "
          f"of an 'on' run ({logged} metric points logged in all)")


if __name__ == "__main__":
    main()
