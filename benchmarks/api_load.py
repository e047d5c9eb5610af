"""Bounded load test of the HTTP service against in-process prediction (the baseline).

Starts `instseg-serve` on 127.0.0.1 with a free port (a tiny untrained maskrcnn_tiny made in
a temporary folder unless --checkpoint is given), sends --requests POST /segment from
--clients concurrent clients, stops the server and prints: errors, throughput, p50/p99
latency (the clients queue for one inference thread, so latency grows with --clients), the
same image through `Predictor.predict` in this process (the throughput ratio is what HTTP,
decoding and encoding cost), and the server's RSS when ready and after each half of the
load (growth in the second half would be a leak).
Exit code 1 when any request failed.

    python benchmarks/api_load.py --clients 8 --requests 200
"""
from __future__ import annotations

import argparse
import io
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image

from instseg_pipeline.predict.predictor import Predictor


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Load-test POST /segment on loopback.")
    parser.add_argument("--clients", type=int, default=8,
                        help="concurrent clients (%(default)s)")
    parser.add_argument("--requests", type=int, default=200,
                        help="requests in all (%(default)s)")
    parser.add_argument("--checkpoint", help="model file to serve (default: a tiny untrained "
                                             "maskrcnn_tiny written to a temporary folder)")
    parser.add_argument("--size", type=int, nargs=2, default=(192, 256), metavar=("H", "W"),
                        help="test image height and width (%(default)s)")
    parser.add_argument("--score-threshold", type=float, default=0.3,
                        help="score_threshold sent with each request (%(default)s)")
    parser.add_argument("--baseline-runs", type=int, default=20,
                        help="in-process predictions for the baseline (%(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads of the server and the baseline; 1 suits "
                             "a machine whose few cores are shared (%(default)s)")
    parser.add_argument("--startup-timeout", type=float, default=120.0,
                        help="seconds to wait for the server (%(default)s)")
    return parser.parse_args(argv)


def _tiny_checkpoint(folder: Path) -> Path:
    import torch

    from instseg_pipeline.models import build_model, model_config

    torch.manual_seed(0)
    params = {"name": "maskrcnn_tiny", "min_size": 224, "max_size": 256, "box_score_thresh": 0.0}
    network = build_model(params, 3)
    path = folder / "model.pt"
    torch.save({"config": model_config(params, 3), "state_dict": network.state_dict(),
                "classes": {1: "a", 2: "b"}, "iterations": 0}, path)
    return path


def _image(height: int, width: int) -> np.ndarray:
    """uint8 [H, W, 3]: smooth gradients with a few bright rectangles."""
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[:height, :width]
    image = np.stack([xs * 255 // width, ys * 255 // height, (xs + ys) % 256], -1)
    for _ in range(4):
        y, x = rng.integers(0, height - 20), rng.integers(0, width - 20)
        image[y:y + 20, x:x + 20] = rng.integers(0, 256, 3)
    return image.astype(np.uint8)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_server(checkpoint: Path, threads: int, timeout: float
                  ) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "instseg_pipeline.commands.serve", "--host", "127.0.0.1",
         "--port", str(port), "--checkpoint", str(checkpoint), "--device", "cpu",
         "--threads", str(threads), "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit(f"server did not become ready within {timeout} s")


def _one(client: httpx.Client, url: str, payload: bytes, threshold: float
         ) -> tuple[float, bool]:
    start = time.perf_counter()
    try:
        response = client.post(f"{url}/segment", files={"file": ("bench.png", payload)},
                               data={"score_threshold": str(threshold)}, timeout=120)
        ok = response.status_code == 200
    except httpx.HTTPError:
        ok = False
    return time.perf_counter() - start, ok


def _load(url: str, payload: bytes, args: argparse.Namespace, count: int
          ) -> tuple[list[float], int, float]:
    """Latencies (s), error count and wall time of ``count`` requests."""
    clients = [httpx.Client() for _ in range(args.clients)]
    start = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        outcomes = list(pool.map(
            lambda i: _one(clients[i % args.clients], url, payload, args.score_threshold),
            range(count)))
    wall = time.perf_counter() - start
    for client in clients:
        client.close()
    return [t for t, _ in outcomes], sum(not ok for _, ok in outcomes), wall


def _baseline(checkpoint: Path, image: np.ndarray, args: argparse.Namespace) -> float:
    """Median seconds of one in-process `Predictor.predict` (after one warm-up)."""
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu", threads=args.threads)
    predictor.predict(image, args.score_threshold)
    times = []
    for _ in range(args.baseline_runs):
        start = time.perf_counter()
        predictor.predict(image, args.score_threshold)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _rss_mib(process: subprocess.Popen) -> float:
    return psutil.Process(process.pid).memory_info().rss / 2**20


def _print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in rows)
    print(f"{'metric':<{width}}  value")
    print(f"{'-' * width}  {'-' * 12}")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    image = _image(*args.size)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(args.checkpoint) if args.checkpoint else _tiny_checkpoint(Path(folder))
        process, url = _start_server(checkpoint, args.threads, args.startup_timeout)
        try:
            # two halves: growth in the second one, once allocators and caches are warm,
            # would be a leak
            rss = [_rss_mib(process)]
            latencies, errors, wall = [], 0, 0.0
            for count in (args.requests // 2, args.requests - args.requests // 2):
                times, failed, seconds = _load(url, buffer.getvalue(), args, count)
                latencies, errors, wall = latencies + times, errors + failed, wall + seconds
                rss.append(_rss_mib(process))
        finally:
            process.terminate()
            process.wait(timeout=30)
        baseline = _baseline(checkpoint, image, args)
    p50, p99 = np.percentile(latencies, [50, 99])
    _print_table([
        ("clients x requests", f"{args.clients} x {args.requests}"),
        ("torch threads", str(args.threads)),
        ("image", f"{args.size[0]}x{args.size[1]} PNG, {len(buffer.getvalue())} bytes"),
        ("errors", str(errors)),
        ("throughput (req/s)", f"{args.requests / wall:.2f}"),
        ("HTTP p50 latency (ms)", f"{p50 * 1e3:.1f}"),
        ("HTTP p99 latency (ms)", f"{p99 * 1e3:.1f}"),
        ("in-process p50 (ms)", f"{baseline * 1e3:.1f}"),
        ("in-process throughput (req/s)", f"{1 / baseline:.2f}"),
        ("HTTP / in-process throughput", f"{args.requests / wall * baseline:.2f}"),
        ("server RSS ready (MiB)", f"{rss[0]:.1f}"),
        ("server RSS after 1st half (MiB)", f"{rss[1]:.1f}"),
        ("server RSS after all (MiB)", f"{rss[2]:.1f}"),
    ])
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
