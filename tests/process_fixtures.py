"""Real server processes for the tests: a free loopback port and a process that is only
handed out once it answers."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_ready(process: subprocess.Popen, url: str, log: Path, what: str,
               timeout: float = 90) -> None:
    """Poll ``url`` until it answers 200; fail with the log tail if the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{what} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"{what} not ready after {timeout} s:\n{log.read_text()[-3000:]}")


@contextmanager
def running(module_args: list[str], log: Path, cwd: Path, env: dict, ready_path: str,
            what: str, timeout: float = 90) -> Iterator[str]:
    """``python -m <module_args> --port P`` on a free port; yields its base URL once
    ``ready_path`` answers, and stops the process afterwards."""
    port = free_port()
    with open(log, "wb") as output:
        process = subprocess.Popen([sys.executable, "-m", *module_args, "--port", str(port)],
                                   cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, url + ready_path, log, what, timeout)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
