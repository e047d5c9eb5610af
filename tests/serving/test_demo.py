"""The Gradio demo: a real ``instseg-demo`` process on 127.0.0.1 (free port) with a tiny
checkpoint, called through ``gradio_client`` and driven in headless Chromium by Playwright;
the click-to-segment logic in-process with the same real model.

The browser test needs Debian's ``chromium`` (``bash scripts/install_chromium.sh``) and
skips without it; Playwright never downloads a browser here. Its screenshots go to
$INSTSEG_ARTIFACTS (default ``tests/artifacts/``). The server runs with an audit hook that
records every connection or name lookup leaving the machine: there must be none.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from model_fixtures import CLASSES, png_bytes, save_checkpoint, scene
from PIL import Image
from process_fixtures import running
from pycocotools import mask as mask_utils

from instseg_pipeline.predict.predictor import Predictor
from instseg_pipeline.serving.demo import (
    CORNER,
    EXCLUDE,
    INCLUDE,
    TABLE_HEADERS,
    add_click,
    answer_prompts,
    empty_prompts,
    enlarge,
    example_images,
    hex_colour,
    state_box,
    state_prompts,
    zoom_factor,
)
from instseg_pipeline.serving.interactive import InteractiveSegmenter

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(os.environ.get("INSTSEG_ARTIFACTS", Path(__file__).resolve().parents[1] / "artifacts"))
STARTUP_S = 90
# Runs in the demo process before anything else: logs every socket connection and name
# lookup that does not stay on this machine.
NETWORK_AUDIT = textwrap.dedent("""
    import os, sys
    _LOG = os.environ["INSTSEG_NETWORK_AUDIT"]
    _LOCAL = {"localhost", "127.0.0.1", "::1", "0.0.0.0", "", "None"}

    def _host(event, args):
        if event == "socket.connect" and isinstance(args[1], tuple):
            return str(args[1][0])
        if event == "socket.getaddrinfo":
            host = args[0]
            return host.decode() if isinstance(host, bytes) else str(host)
        return None

    def _audit(event, args):
        host = _host(event, args)
        if host is not None and host not in _LOCAL and not host.startswith("127."):
            with open(_LOG, "a") as log:
                log.write(f"{event} {host}\\n")

    sys.addaudithook(_audit)
    with open(_LOG, "a") as log:  # proves the hook is installed
        log.write("network audit active\\n")
""")


# --- the demo process ---------------------------------------------------------------------------

def _demo_env(folder: Path) -> dict:
    hooks = folder / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(NETWORK_AUDIT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INSTSEG_", "GRADIO_"))}
    return {**env, "PYTHONPATH": str(hooks), "GRADIO_TEMP_DIR": str(folder / "gradio"),
            "INSTSEG_NETWORK_AUDIT": str(folder / "network.log")}


def demo_process(args: list[str], folder: Path):
    """``instseg-demo`` with ``args`` on a free port in ``folder``; yields its URL."""
    return running(["instseg_pipeline.commands.demo", *args, "--host", "127.0.0.1"],
                   folder / "demo.log", folder, _demo_env(folder), "/config", "demo",
                   STARTUP_S)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("model") / "model.pt")


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "scene.png"
    path.write_bytes(png_bytes(scene(192, 256)))
    return path


@pytest.fixture(scope="module")
def demo(checkpoint, tmp_path_factory):
    """URL and folder of a running demo; after the module, its network log must be empty."""
    folder = tmp_path_factory.mktemp("demo")
    args = ["--checkpoint", str(checkpoint), "--device", "cpu", "--threads", "1",
            "--score-threshold", "0"]
    with demo_process(args, folder) as url:
        yield url, folder
    network = (folder / "network.log").read_text()
    assert network == "network audit active\n", f"the demo reached out:\n{network[:2000]}"
    assert "stopping the demo" in (folder / "demo.log").read_text()


# --- API level (gradio_client) ------------------------------------------------------------------

def _segment(url: str, path: Path, threshold: float):
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False, analytics_enabled=False)
    return client.predict(handle_file(str(path)), threshold, api_name="/segment")


def _decode(rle: dict) -> np.ndarray:
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})


def test_segment_api_returns_overlay_table_and_instances(demo, image_file):
    url, _ = demo
    overlay_path, table, instances = _segment(url, image_file, 0.0)
    original = np.asarray(Image.open(image_file).convert("RGB"))
    overlay = np.asarray(Image.open(overlay_path).convert("RGB"))
    factor = zoom_factor(original.shape)
    assert factor > 1 and overlay.shape == (192 * factor, 256 * factor, 3)
    assert instances and len(table["data"]) == len(instances)
    assert table["headers"] == TABLE_HEADERS
    for k, (row, inst) in enumerate(zip(table["data"], instances)):
        assert row[1] == inst["category_name"] == CLASSES[inst["label"]]
        assert row[5] == hex_colour(k) and row[4] == inst["area"]
    assert [i["score"] for i in instances] == sorted((i["score"] for i in instances),
                                                     reverse=True)
    # the first instance with pixels is tinted in its colour on the overlay
    mask = _decode(next(i for i in instances if i["area"] > 0)["rle"]).astype(bool)
    assert mask.shape == original.shape[:2]
    mask, original = enlarge(mask, factor), enlarge(original, factor)
    assert np.abs(overlay[mask].astype(int) - original[mask]).mean() > 10
    # away from every box the overlay is the image itself, pixel for pixel
    away = np.ones(mask.shape, bool)
    for inst in instances:
        x1, y1, x2, y2 = (np.array(inst["box"]) * factor).round().astype(int)
        away[max(y1 - 30, 0):y2 + 3, max(x1 - 3, 0):x2 + 200] = False  # tags run right
    assert away.any() and np.array_equal(overlay[away], original[away])


def test_segment_api_threshold_filters(demo, image_file):
    url, _ = demo
    _, _, everything = _segment(url, image_file, 0.0)
    cut = float(np.median([i["score"] for i in everything]))
    _, table, kept = _segment(url, image_file, cut)
    assert 0 < len(kept) < len(everything) and all(i["score"] >= cut for i in kept)
    assert len(table["data"]) == len(kept)
    _, table, none = _segment(url, image_file, 1.0)
    assert none == [] and table["data"] in ([], [[""] * len(TABLE_HEADERS)])


# --- browser (headless Chromium through Playwright) ---------------------------------------------

@pytest.fixture
def page(tmp_path):
    """A Playwright page in Debian's headless Chromium with a fresh profile."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: run `bash scripts/install_chromium.sh` "
                    "(Debian package chromium) to enable the browser test")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 1100})
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


def _screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    with Image.open(path) as shot:
        assert shot.format == "PNG" and min(shot.size) >= 400
        pixels = np.asarray(shot.convert("RGB"))
    assert path.stat().st_size > 20_000 and pixels.std() > 10  # not a blank page
    return path


def _natural_width(page, selector: str) -> int:
    """Pixel width of the image file an <img> shows, once it has loaded."""
    image = page.locator(selector).first
    page.wait_for_function("img => img.complete && img.naturalWidth > 0",
                           arg=image.element_handle(), timeout=10_000)
    return image.evaluate("img => img.naturalWidth")


def _external(requests: list[str], url: str) -> list[str]:
    return [r for r in requests if not r.startswith((url, "data:", "blob:", "about:"))]


def test_browser_segments_an_upload(demo, image_file, page):
    url, _ = demo
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto(url)
    page.locator("#segment-input input[type=file]").set_input_files(str(image_file))
    page.locator("#segment-input img").first.wait_for(timeout=20_000)
    page.locator("#segment-run").click()
    page.locator("#segment-overlay img").first.wait_for(timeout=30_000)
    assert _natural_width(page, "#segment-overlay img") == 256 * zoom_factor((192, 256))
    table = page.locator("#segment-table")
    names = "|".join(CLASSES.values())
    page.wait_for_function("([el, names]) => new RegExp(names).test(el.innerText)",
                           arg=[table.element_handle(), names], timeout=10_000)
    listed = re.findall(rf"^\s*({names})\s*$", table.inner_text(), re.MULTILINE)
    assert len(listed) >= 1
    shot = _screenshot(page, "demo_segment.png")
    assert _external(requests, url) == [], f"page loaded outside resources ({shot})"


def test_browser_click_segments(demo, image_file, page):
    url, _ = demo
    page.goto(url)
    page.locator("button[role=tab]", has_text="Interactive").click()
    page.locator("#interactive-input input[type=file]").set_input_files(str(image_file))
    shown = page.locator("#interactive-input img").first
    shown.wait_for(timeout=20_000)
    box = shown.bounding_box()
    # the disk of `scene` is centred at (W / 3, H / 2)
    page.mouse.click(box["x"] + box["width"] / 3, box["y"] + box["height"] / 2)
    page.locator("#interactive-overlay img").first.wait_for(timeout=30_000)
    answer = page.locator("#interactive-answer textarea")
    page.wait_for_function("el => el.value.includes('mask')", arg=answer.element_handle(),
                           timeout=10_000)
    assert answer.input_value().split(":")[0] in ("model", "grabcut")
    assert _natural_width(page, "#interactive-overlay img") == 256 * zoom_factor((192, 256))
    _screenshot(page, "demo_interactive.png")


# --- click-to-segment logic in-process ----------------------------------------------------------

def test_clicks_build_prompts():
    state = add_click(empty_prompts(), 10, 20, EXCLUDE)
    assert state_prompts(state) is None  # an exclude point alone asks for nothing
    state = add_click(state, 5, 6, CORNER)
    assert state_box(state) is None and state_prompts(state) is None
    state = add_click(state, 1, 30, CORNER)
    assert state_box(state).tolist() == [1, 6, 5, 30]
    prompts = state_prompts(add_click(state, 3, 8, INCLUDE))
    assert prompts.labels.tolist() == [0, 1] and prompts.points.tolist() == [[10, 20], [3, 8]]
    assert state_box(add_click(state, 7, 7, CORNER)) is None  # a third corner starts anew
    assert state_box(add_click(add_click(empty_prompts(), 4, 4, CORNER), 4, 9, CORNER)) is None


def test_clicks_stop_at_the_prompt_point_limit():
    import gradio as gr

    from instseg_pipeline.serving.interactive import MAX_PROMPT_POINTS

    state = empty_prompts()
    for i in range(MAX_PROMPT_POINTS):
        state = add_click(state, i, i, INCLUDE)
    with pytest.raises(gr.Error, match=f"at most {MAX_PROMPT_POINTS} prompt points"):
        add_click(state, 1, 1, EXCLUDE)
    assert len(add_click(state, 2, 3, CORNER)["corners"]) == 1  # box corners are not points


def test_answers_name_the_method(checkpoint):
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu", threads=1)
    segmenter = InteractiveSegmenter(predictor)
    image = scene(192, 256)
    found = predictor.detect(image, 0.0)
    ys, xs = np.nonzero(found.masks[int(np.argmax(found.masks.sum(axis=(1, 2))))])
    on_instance = add_click(empty_prompts(), float(xs[len(xs) // 2]), float(ys[len(ys) // 2]),
                            INCLUDE)
    overlay, text = answer_prompts(segmenter, image, on_instance, 0.0)
    factor = zoom_factor(image.shape)
    assert text.startswith("model:") and overlay.shape == (192 * factor, 256 * factor, 3)
    assert not np.array_equal(overlay, enlarge(image, factor))
    # nothing scores 1.0, so GrabCut answers; it must find the disk under the click
    on_disk = add_click(empty_prompts(), 256 / 3, 96, INCLUDE)
    _, text = answer_prompts(segmenter, image, on_disk, 1.0)
    assert text.startswith("grabcut: 1 mask(s)")
    mask = segmenter.segment(image, state_prompts(on_disk), 1.0).masks[0].astype(bool)
    disk = np.all(image == (240, 200, 40), axis=-1)
    assert (mask & disk).sum() / (mask | disk).sum() > 0.8


# --- examples and the command line --------------------------------------------------------------

def test_examples_from_folder_or_generated(tmp_path):
    folder = tmp_path / "given"
    folder.mkdir()
    for name in ("b.png", "a.jpg", "notes.txt"):
        (folder / name).write_bytes(b"x")
    assert [p.name for p in example_images(folder, tmp_path / "scratch", 5)] == ["a.jpg",
                                                                                "b.png"]
    made = example_images(tmp_path / "missing", tmp_path / "scratch", 3)
    assert len(made) == 3
    for path in made:
        with Image.open(path) as picture:
            assert picture.mode == "RGB" and min(picture.size) >= 160


def test_cli_help_and_missing_model(tmp_path):
    from instseg_pipeline.commands.demo import _build_parser

    assert all(action.help for action in _build_parser()._actions)
    command = [sys.executable, "-m", "instseg_pipeline.commands.demo"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("INSTSEG_")}
    shown = subprocess.run([*command, "--help"], capture_output=True, text=True, check=True,
                           env=env)
    for option in ("--checkpoint", "--onnx", "--host", "--port", "--examples",
                   "--score-threshold"):
        assert option in shown.stdout
    missing = subprocess.run([*command, "--root", str(tmp_path)], capture_output=True,
                             text=True, env=env, timeout=120, check=False)
    assert missing.returncode == 2
    assert "no trained model found" in missing.stderr and str(tmp_path) in missing.stderr
