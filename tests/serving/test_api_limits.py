"""The service stays bounded under load, through a real uvicorn process on 127.0.0.1: a
chunked oversize upload is refused while it streams, requests beyond the queue get 503 with
Retry-After at once while /health answers, and prompt points are capped."""
from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from model_fixtures import png_bytes, save_checkpoint, scene
from process_fixtures import running

from instseg_pipeline.serving.api import (
    DEFAULT_MAX_QUEUE,
    ServiceSettings,
    retry_after_seconds,
)
from instseg_pipeline.serving.interactive import (
    MAX_PROMPT_POINTS,
    PromptError,
    parse_prompts,
)

MAX_UPLOAD = 300_000
FORM_SLACK = 64 * 1024  # api.FORM_OVERHEAD_BYTES: multipart framing allowed over the limit
MAX_QUEUE = 1
MAX_POINTS = 4
CHUNK = 64 * 1024


def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("INSTSEG_")}


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    """One server with a queue of 1 (2 requests admitted at once) and 4 prompt points."""
    folder = tmp_path_factory.mktemp("limits")
    checkpoint = save_checkpoint(folder / "model.pt")
    args = ["instseg_pipeline.commands.serve", "--host", "127.0.0.1", "--checkpoint",
            str(checkpoint), "--device", "cpu", "--max-upload-bytes", str(MAX_UPLOAD),
            "--max-queue", str(MAX_QUEUE), "--max-points", str(MAX_POINTS), "--threads", "1",
            "--log-level", "warning"]
    with running(args, folder / "server.log", folder, _clean_env(), "/health",
                 "server") as base:
        yield base


@pytest.fixture(scope="module")
def payload() -> bytes:
    return png_bytes(scene(192, 256))


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def _multipart_head(boundary: str, path: str, host: str, chunked: bool,
                    length: int = 0) -> bytes:
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {length}"
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\n{framing}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n").encode()


def _chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk: hex size, CRLF, data, CRLF."""
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _status_and_body(sock: socket.socket) -> tuple[int, dict, bytes]:
    """Status code, lower-cased headers and body of the response waiting on ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    while len(body) < int(headers.get("content-length", 0)):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, body


# --- chunked uploads ----------------------------------------------------------------------------

def test_chunked_oversize_upload_is_refused_while_streaming(url):
    """Transfer-Encoding: chunked, no Content-Length: the 413 comes back after about the
    limit has been sent, long before the 64 MiB body ends (so nothing past the limit is
    spooled); the old behaviour read the whole body first and would time out here."""
    host, port = _address(url)
    boundary = "instsegchunked"
    sent, budget = 0, 64 * 2**20
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(_multipart_head(boundary, "/segment", host, chunked=True))
        sock.sendall(_chunk(f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
                            f"filename=\"huge.png\"\r\nContent-Type: image/png\r\n\r\n"
                            .encode()))
        zeros = _chunk(b"\0" * CHUNK)
        while sent < budget and not select.select([sock], [], [], 0)[0]:
            sock.sendall(zeros)
            sent += CHUNK
        assert select.select([sock], [], [], 30)[0], f"no answer after {sent} bytes"
        status, headers, body = _status_and_body(sock)
    assert status == 413, body
    assert headers["content-type"] == "application/json"
    assert "upload limit of 300000 bytes" in json.loads(body)["detail"]
    # kernel socket buffers on loopback hold a few MiB that were sent but never read
    assert sent < MAX_UPLOAD + FORM_SLACK + 16 * 2**20, sent


def test_chunked_upload_under_the_limit_is_served(url, payload):
    """The streaming count does not refuse a chunked upload that fits."""
    response = httpx.post(f"{url}/segment", content=iter([_form(payload)[:500],
                                                          _form(payload)[500:]]),
                          headers={"content-type": "multipart/form-data; boundary=b0undary"},
                          timeout=60)
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert response.status_code == 200, response.text


def _form(payload: bytes) -> bytes:
    return (b"--b0undary\r\nContent-Disposition: form-data; name=\"file\"; "
            b"filename=\"scene.png\"\r\nContent-Type: image/png\r\n\r\n" + payload +
            b"\r\n--b0undary--\r\n")


# --- the queue ----------------------------------------------------------------------------------

class HeldRequest:
    """A /segment request whose upload stops half way: it holds one queue slot until
    `finish` sends the rest."""

    def __init__(self, url: str, payload: bytes):
        self.host, port = _address(url)
        self.body = _form(payload)
        self.sock = socket.create_connection((self.host, port), timeout=60)
        self.sock.sendall(_multipart_head("b0undary", "/segment", self.host, chunked=False,
                                          length=len(self.body)))
        self.sock.sendall(self.body[:100])

    def finish(self) -> tuple[int, dict, bytes]:
        self.sock.sendall(self.body[100:])
        try:
            return _status_and_body(self.sock)
        finally:
            self.sock.close()


def _wait_until_full(url: str, timeout: float = 30) -> None:
    """Until a probe without a file gets 503: the held requests hold every slot. A probe
    admitted before that is answered 422 (no file) at once and frees its slot."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.post(f"{url}/segment", timeout=30).status_code == 503:
            return
        time.sleep(0.05)
    pytest.fail(f"the queue was not full after {timeout} s")


def test_full_queue_answers_503_at_once_and_health_stays_up(url, payload):
    held = [HeldRequest(url, payload) for _ in range(MAX_QUEUE + 1)]
    _wait_until_full(url)
    try:
        start = time.perf_counter()
        refused = httpx.post(f"{url}/segment", files={"file": ("a.png", payload)}, timeout=30)
        refused_seconds = time.perf_counter() - start
        start = time.perf_counter()
        health = httpx.get(f"{url}/health", timeout=30)
        health_seconds = time.perf_counter() - start
        interactive = httpx.post(f"{url}/segment_interactive", files={"file": ("a.png", payload)},
                                 data={"points": "[[10, 10]]", "labels": "[1]"}, timeout=30)
    finally:
        answers = [request.finish() for request in held]
    assert refused.status_code == 503, refused.text
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["content-type"] == "application/json"
    assert "queue is full" in refused.json()["detail"]
    assert f"max_queue {MAX_QUEUE}" in refused.json()["detail"]
    assert interactive.status_code == 503 and "retry-after" in interactive.headers
    assert refused_seconds < 2.0 and health.status_code == 200 and health_seconds < 2.0
    assert [status for status, _, _ in answers] == [200] * len(held)
    # the slots are free again
    after = httpx.post(f"{url}/segment", files={"file": ("a.png", payload)}, timeout=60)
    assert after.status_code == 200, after.text


def test_more_clients_than_the_queue_some_503_rest_200(url, payload):
    clients = 8
    barrier = threading.Barrier(clients)

    def one(_) -> tuple[int, float, str | None]:
        with httpx.Client(timeout=60) as client:
            barrier.wait()
            start = time.perf_counter()
            response = client.post(f"{url}/segment", files={"file": ("a.png", payload)},
                                   data={"score_threshold": "0"})
            return (response.status_code, time.perf_counter() - start,
                    response.headers.get("retry-after"))

    with ThreadPoolExecutor(clients) as pool:
        outcomes = list(pool.map(one, range(clients)))  # every call returns: nothing hangs
    codes = [code for code, _, _ in outcomes]
    assert set(codes) <= {200, 503}, codes
    assert 1 <= codes.count(200) and codes.count(503) >= clients - 2 * (MAX_QUEUE + 1), codes
    assert all(retry.isdigit() and int(retry) >= 1
               for code, _, retry in outcomes if code == 503)
    slowest_ok = max(seconds for code, seconds, _ in outcomes if code == 200)
    assert max(seconds for code, seconds, _ in outcomes if code == 503) < slowest_ok


def test_retry_after_covers_the_backlog():
    assert retry_after_seconds(0.01, 2) == 1
    assert retry_after_seconds(0.6, 3) == 2
    assert retry_after_seconds(2.5, 4) == 10


# --- prompt points ------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, field, message", [
    ({"points": json.dumps([[5, 5]] * 5), "labels": json.dumps([1] * 5)}, "points",
     "points has 5 entries, over the limit of 4 prompt points"),
    ({"points": "[[5, 5]]", "labels": json.dumps([1] * 5)}, "labels",
     "labels has 5 entries, over the limit of 4"),
    ({"points": "[]", "labels": "[]", "box": "[[1, 1, 9, 9], [2, 2, 8, 8]]"}, "box",
     "box must be one [x1, y1, x2, y2]"),
    ({"points": "[" * 50_000, "labels": "[1]"}, "points", "nested too deeply"),
])
def test_prompt_bounds_are_422(url, payload, fields, field, message):
    response = httpx.post(f"{url}/segment_interactive", files={"file": ("a.png", payload)},
                          data=fields, timeout=60)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"][0]
    assert detail["loc"] == ["body", field] and message in detail["msg"]


def test_points_up_to_the_limit_are_served(url, payload):
    points = [[20 + 10 * i, 30] for i in range(MAX_POINTS)]
    response = httpx.post(f"{url}/segment_interactive", files={"file": ("a.png", payload)},
                          data={"points": json.dumps(points),
                                "labels": json.dumps([1] * MAX_POINTS)}, timeout=60)
    assert response.status_code == 200, response.text


def test_parse_prompts_default_limit():
    many = json.dumps([[1, 1]] * (MAX_PROMPT_POINTS + 1))
    with pytest.raises(PromptError, match=f"over the limit of {MAX_PROMPT_POINTS}"):
        parse_prompts(many, json.dumps([1] * (MAX_PROMPT_POINTS + 1)))
    ok = parse_prompts(json.dumps([[1, 1]] * MAX_PROMPT_POINTS),
                       json.dumps([1] * MAX_PROMPT_POINTS))
    assert ok.points.shape == (MAX_PROMPT_POINTS, 2)


# --- settings, help and OpenAPI -----------------------------------------------------------------

def test_settings_read_and_check_the_limits():
    settings = ServiceSettings.from_env({"INSTSEG_MAX_QUEUE": "3", "INSTSEG_MAX_POINTS": "9"})
    assert (settings.max_queue, settings.max_points) == (3, 9)
    default = ServiceSettings.from_env({})
    assert (default.max_queue, default.max_points) == (DEFAULT_MAX_QUEUE, MAX_PROMPT_POINTS)
    with pytest.raises(ValueError, match=r"max_queue \(\$INSTSEG_MAX_QUEUE / --max-queue\) "
                                         r"must be >= 0, got -1"):
        ServiceSettings.from_env({"INSTSEG_MAX_QUEUE": "-1"})
    with pytest.raises(ValueError, match="max_points .* must be >= 1, got 0"):
        ServiceSettings(max_points=0)


def test_serve_refuses_a_negative_queue(tmp_path):
    result = subprocess.run([sys.executable, "-m", "instseg_pipeline.commands.serve",
                             "--max-queue", "-2", "--checkpoint", str(tmp_path / "none.pt")],
                            cwd=tmp_path, env=_clean_env(), capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 2, result.stderr
    assert "max_queue ($INSTSEG_MAX_QUEUE / --max-queue) must be >= 0, got -2" in result.stderr


def test_serve_help_documents_the_limits():
    out = subprocess.run([sys.executable, "-m", "instseg_pipeline.commands.serve", "--help"],
                         check=False, capture_output=True, text=True, timeout=60).stdout
    flat = " ".join(out.split())
    assert f"INSTSEG_MAX_QUEUE; default {DEFAULT_MAX_QUEUE}" in flat
    assert f"INSTSEG_MAX_POINTS; default {MAX_PROMPT_POINTS}" in flat
    assert "503 with Retry-After" in flat


def test_openapi_documents_503_and_the_point_limit(url):
    schema = httpx.get(f"{url}/openapi.json", timeout=30).json()
    for path in ("/segment", "/segment_interactive"):
        operation = schema["paths"][path]["post"]
        assert "Retry-After" in operation["responses"]["503"]["headers"], path
        assert "max_queue" in operation["description"], path
    form = schema["paths"]["/segment_interactive"]["post"]["requestBody"]["content"][
        "multipart/form-data"]["schema"]["$ref"].split("/")[-1]
    points = schema["components"]["schemas"][form]["properties"]["points"]["description"]
    assert f"default {MAX_PROMPT_POINTS}" in points

