"""Bounded load test of the HTTP service, with a chunked oversize upload alongside.

Starts `instseg-serve` on 127.0.0.1 with a free port (a tiny untrained maskrcnn_tiny made in
a temporary folder unless --checkpoint is given) and a queue of --max-queue, then at once:
- --clients concurrent clients send --requests POST /segment in all (more clients than
  1 + --max-queue, so some are refused); a client waits --backoff seconds after a 503;
- one client streams --chunked-count uploads of --chunked-mb MiB each with
  Transfer-Encoding: chunked (no Content-Length), the first before the other clients start
  (so it is admitted and must be refused with 413 once past the upload limit), the others
  while the load runs (refused with 413, or with 503 when the queue is full);
- one client polls GET /health every 0.1 s;
- a sampler reads the server's RSS and the size of the largest file it holds open (a form
  upload spooled to disk) every --sample-interval seconds.
Everything stops at --time-limit: clients send nothing new after it, and each request has
a timeout. Prints one table: status codes with p50 / p99 latency per endpoint, the chunked
upload's answer, time and bytes sent, /health latency under load, the server's RSS (ready,
peak, end) and the largest spooled file, and the same image through `Predictor.predict` in
this process (the baseline).
Exit code 1 when a request failed (transport error, timeout, a status other than 200 and
503 on /segment, or anything but 413 for the first chunked upload and 413 or 503 for
the others).

    python benchmarks/api_load.py --clients 8 --max-queue 2 --requests 200 --chunked-mb 200 \
        --chunked-count 3
"""
from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image

from instseg_pipeline.predict.predictor import Predictor

MiB = 2**20


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Load-test POST /segment on loopback, with a "
                                                 "chunked oversize upload alongside.")
    parser.add_argument("--clients", type=int, default=8,
                        help="concurrent /segment clients (%(default)s)")
    parser.add_argument("--requests", type=int, default=200,
                        help="/segment requests in all (%(default)s)")
    parser.add_argument("--max-queue", type=int, default=2,
                        help="the server's --max-queue; keep 1 + it below --clients to see "
                             "503s (%(default)s)")
    parser.add_argument("--chunked-mb", type=int, default=200,
                        help="MiB of each chunked upload sent alongside; 0: none "
                             "(%(default)s)")
    parser.add_argument("--chunked-count", type=int, default=3,
                        help="chunked uploads, one after the other (%(default)s)")
    parser.add_argument("--time-limit", type=float, default=120.0,
                        help="seconds after which clients start no new request "
                             "(%(default)s)")
    parser.add_argument("--backoff", type=float, default=0.1,
                        help="seconds a client waits after a 503 before its next request "
                             "(%(default)s)")
    parser.add_argument("--sample-interval", type=float, default=0.02,
                        help="seconds between RSS samples of the server (%(default)s)")
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


# --- the server ---------------------------------------------------------------------------------

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


def _start_server(checkpoint: Path, args: argparse.Namespace
                  ) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("INSTSEG_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "instseg_pipeline.commands.serve", "--host", "127.0.0.1",
         "--port", str(port), "--checkpoint", str(checkpoint), "--device", "cpu",
         "--threads", str(args.threads), "--max-queue", str(args.max_queue),
         "--log-level", "error"], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit(f"server did not become ready within {args.startup_timeout} s")


@dataclass
class Sampler:
    """Samples the server's RSS and its largest open file (bytes) on a thread."""

    pid: int
    interval: float
    rss: list[int] = field(default_factory=list)
    largest_file: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        process = psutil.Process(self.pid)
        while not self.stop.is_set():
            try:
                self.rss.append(process.memory_info().rss)
                self.largest_file = max(self.largest_file, _largest_open_file(self.pid))
            except psutil.Error:
                return
            self.stop.wait(self.interval)


def _largest_open_file(pid: int) -> int:
    """Size of the largest regular file ``pid`` holds open (a spooled upload is unlinked,
    so only /proc/<pid>/fd still reaches it)."""
    largest = 0
    folder = Path(f"/proc/{pid}/fd")
    for fd in folder.iterdir() if folder.is_dir() else ():
        try:
            stat = os.stat(fd)
        except OSError:
            continue
        if stat.st_mode & 0o170000 == 0o100000:  # S_IFREG
            largest = max(largest, stat.st_size)
    return largest


# --- the clients --------------------------------------------------------------------------------

@dataclass
class Outcome:
    """One request: what it asked, its status (0 for a transport error) and its seconds."""

    what: str
    status: int
    seconds: float
    sent: int = 0


def _segment_client(url: str, payload: bytes, args: argparse.Namespace, tickets: Iterator,
                    lock: threading.Lock, deadline: float) -> list[Outcome]:
    """Takes request tickets until none are left or the deadline passed."""
    outcomes = []
    with httpx.Client(timeout=60) as client:
        while time.monotonic() < deadline:
            with lock:
                if next(tickets, None) is None:
                    break
            start = time.perf_counter()
            try:
                status = client.post(f"{url}/segment", files={"file": ("bench.png", payload)},
                                     data={"score_threshold": str(args.score_threshold)}
                                     ).status_code
            except httpx.HTTPError:
                status = 0
            outcomes.append(Outcome("/segment", status, time.perf_counter() - start))
            if status == 503:
                time.sleep(args.backoff)
    return outcomes


def _chunked_upload(url: str, mib: int, what: str, streaming: threading.Event) -> Outcome:
    """POST /segment with ``mib`` MiB streamed in 1 MiB chunks (no Content-Length); sets
    ``streaming`` once the first MiB is handed to the client."""
    boundary = "benchboundary"
    sent = 0

    def body() -> Iterator[bytes]:
        nonlocal sent
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
                f"filename=\"huge.png\"\r\nContent-Type: image/png\r\n\r\n").encode()
        yield head
        block = b"\0" * MiB
        for _ in range(mib):
            sent += MiB
            yield block
            streaming.set()
        yield f"\r\n--{boundary}--\r\n".encode()

    start = time.perf_counter()
    try:
        status = httpx.post(f"{url}/segment", content=body(), timeout=120, headers={
            "content-type": f"multipart/form-data; boundary={boundary}"}).status_code
    except httpx.HTTPError:
        status = 0
    return Outcome(what, status, time.perf_counter() - start, sent)


def _chunked_uploads(url: str, args: argparse.Namespace, streaming: threading.Event
                     ) -> list[Outcome]:
    """--chunked-count chunked uploads one after the other: "chunked first", "chunked"."""
    return [_chunked_upload(url, args.chunked_mb, "chunked first" if i == 0 else "chunked",
                            streaming) for i in range(args.chunked_count)]


def _health_probe(url: str, stop: threading.Event) -> list[Outcome]:
    outcomes = []
    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            start = time.perf_counter()
            try:
                status = client.get(f"{url}/health").status_code
            except httpx.HTTPError:
                status = 0
            outcomes.append(Outcome("/health", status, time.perf_counter() - start))
            stop.wait(0.1)
    return outcomes


def _load(url: str, payload: bytes, args: argparse.Namespace
          ) -> tuple[list[Outcome], float]:
    """Every outcome (segment clients, the chunked upload, health probes) and wall time."""
    tickets, lock = iter(range(args.requests)), threading.Lock()
    deadline = time.monotonic() + args.time_limit
    stop_health, streaming = threading.Event(), threading.Event()
    with ThreadPoolExecutor(args.clients + 2) as pool:
        health = pool.submit(_health_probe, url, stop_health)
        chunked = None
        if args.chunked_mb and args.chunked_count:
            chunked = pool.submit(_chunked_uploads, url, args, streaming)
            # the first chunked upload holds its queue slot before the crowd arrives
            streaming.wait(30)
        start = time.perf_counter()
        clients = [pool.submit(_segment_client, url, payload, args, tickets, lock, deadline)
                   for _ in range(args.clients)]
        outcomes = [o for future in clients for o in future.result()]
        wall = time.perf_counter() - start
        if chunked is not None:
            outcomes += chunked.result()
        stop_health.set()
        outcomes += health.result()
    return outcomes, wall


# --- the report ---------------------------------------------------------------------------------

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


def _status_rows(outcomes: list[Outcome]) -> list[tuple[str, ...]]:
    """(request, status, count, p50 ms, p99 ms) per request kind and status."""
    groups: dict[tuple[str, int], list[Outcome]] = defaultdict(list)
    for outcome in outcomes:
        groups[(outcome.what, outcome.status)].append(outcome)
    rows = []
    for (what, status), group in sorted(groups.items()):
        p50, p99 = np.percentile([o.seconds for o in group], [50, 99]) * 1e3
        rows.append((what, str(status or "error"), str(len(group)), f"{p50:.1f}",
                     f"{p99:.1f}"))
    return rows


def _print_rows(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def _failed(outcomes: list[Outcome]) -> int:
    """Requests that did not end as they should: /segment 200 or 503, the chunked upload
    413, /health 200."""
    expected = {"/segment": {200, 503}, "/health": {200}, "chunked first": {413},
                "chunked": {413, 503}}
    return sum(o.status not in expected[o.what] for o in outcomes)


def _report(outcomes: list[Outcome], wall: float, sampler: Sampler, baseline: float,
            args: argparse.Namespace, payload_bytes: int) -> None:
    _print_rows(("request", "status", "count", "p50 ms", "p99 ms"), _status_rows(outcomes))
    print()
    chunked = [o for o in outcomes if o.what.startswith("chunked")]
    chunk_text = f"{args.chunked_count} x {args.chunked_mb} MiB" if chunked else "none"
    served = sum(o.what == "/segment" and o.status == 200 for o in outcomes)
    rows = [
        ("clients x requests", f"{args.clients} x {args.requests}"),
        ("server max-queue, time limit", f"{args.max_queue}, {args.time_limit:g} s"),
        ("image", f"{args.size[0]}x{args.size[1]} PNG, {payload_bytes} bytes"),
        ("wall time of the /segment load (s)", f"{wall:.2f}"),
        ("served /segment throughput (req/s)", f"{served / wall:.2f}"),
        ("in-process p50 (ms)", f"{baseline * 1e3:.1f}"),
        ("server RSS ready (MiB)", f"{sampler.rss[0] / MiB:.1f}"),
        ("server RSS peak (MiB)", f"{max(sampler.rss) / MiB:.1f}"),
        ("server RSS end (MiB)", f"{sampler.rss[-1] / MiB:.1f}"),
        ("RSS samples", str(len(sampler.rss))),
        ("largest file the server held open (MiB)", f"{sampler.largest_file / MiB:.1f}"),
        ("failed requests", str(_failed(outcomes))),
    ]
    for number, o in reversed(list(enumerate(chunked, 1))):
        answer = f"{o.status} after {o.seconds:.2f} s, {o.sent / MiB:.0f} MiB sent"
        rows.insert(3, (f"chunked upload {number}", answer))
    rows.insert(3, ("chunked uploads (no Content-Length)", chunk_text))
    _print_rows(("metric", "value"), rows)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    image = _image(*args.size)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(args.checkpoint) if args.checkpoint else _tiny_checkpoint(Path(folder))
        process, url = _start_server(checkpoint, args)
        sampler = Sampler(process.pid, args.sample_interval)
        thread = threading.Thread(target=sampler.run, daemon=True)
        thread.start()
        try:
            outcomes, wall = _load(url, buffer.getvalue(), args)
        finally:
            sampler.stop.set()
            thread.join()
            process.terminate()
            process.wait(timeout=30)
        baseline = _baseline(checkpoint, image, args)
    _report(outcomes, wall, sampler, baseline, args, len(buffer.getvalue()))
    return 1 if _failed(outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
