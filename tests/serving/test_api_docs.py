"""/docs (Swagger UI) is served from the packaged assets, so it renders with no network."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from model_fixtures import save_checkpoint
from process_fixtures import running

from instseg_pipeline.serving.api import ServiceSettings, create_app
from instseg_pipeline.serving.docs import OPENAPI_30, to_openapi_30

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def client() -> TestClient:
    # without `with` the lifespan (model loading) does not run: /docs needs no model
    return TestClient(create_app(ServiceSettings()))


def _asset_urls(html: str) -> list[str]:
    """Every script src, link href and string URL the page names."""
    tags = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)
    strings = re.findall(r"""["'](\w+://[^"']+|//[^"']+)["']""", html)
    return tags + strings


def test_docs_html_names_only_local_assets(client):
    page = client.get("/docs")
    assert page.status_code == 200 and "swagger-ui" in page.text
    urls = _asset_urls(page.text)
    assert len(urls) >= 3, urls  # script, stylesheet, icon
    remote = [u for u in urls if not u.startswith("/")]
    assert remote == [], f"/docs loads from outside the server: {remote}"
    for url, kind in (("swagger-ui-bundle.js", "javascript"), ("swagger-ui.css", "css")):
        local = next(u for u in urls if u.endswith(url))
        asset = client.get(local)
        assert asset.status_code == 200 and kind in asset.headers["content-type"], local
        assert len(asset.content) > 10_000, local
    assert f"'{OPENAPI_30}'" in page.text or f'"{OPENAPI_30}"' in page.text


def test_redoc_is_off_and_docs_stay_out_of_the_schema(client):
    assert client.get("/redoc").status_code == 404
    schema = client.get("/openapi.json").json()
    assert schema["openapi"].startswith("3.1")
    assert "/docs" not in schema["paths"] and OPENAPI_30 not in schema["paths"]
    assert "/segment" in schema["paths"]


def test_docs_document_is_openapi_30_with_the_same_operations(client):
    full, docs = client.get("/openapi.json").json(), client.get(OPENAPI_30).json()
    assert docs["openapi"] == "3.0.3"
    assert {p: set(ops) for p, ops in docs["paths"].items()} \
        == {p: set(ops) for p, ops in full["paths"].items()}
    text = str(docs)
    assert "'null'" not in text and "contentMediaType" not in text and "'const'" not in text
    body = docs["components"]["schemas"]["Body_segment_segment_post"]["properties"]
    assert body["file"]["format"] == "binary"  # Swagger UI offers a file chooser
    assert body["score_threshold"] == {**body["score_threshold"], "type": "number",
                                       "nullable": True, "maximum": 1.0}


def test_openapi_30_rewrites_only_31_forms():
    document = {"openapi": "3.1.0", "components": {"schemas": {"S": {"properties": {
        "a": {"anyOf": [{"type": "integer"}, {"type": "null"}], "title": "A"},
        "b": {"anyOf": [{"$ref": "#/components/schemas/T"}, {"type": "null"}]},
        "c": {"anyOf": [{"type": "integer"}, {"type": "string"}, {"type": "null"}]},
        "d": {"const": "x", "type": "string"},
        "e": {"type": "string", "contentMediaType": "application/octet-stream"},
        "f": {"type": "array", "items": {"type": "number"}}}}}}}
    converted = to_openapi_30(document)
    assert converted["openapi"] == "3.0.3" and document["openapi"] == "3.1.0"
    props = converted["components"]["schemas"]["S"]["properties"]
    assert props["a"] == {"type": "integer", "title": "A", "nullable": True}
    assert props["b"] == {"allOf": [{"$ref": "#/components/schemas/T"}], "nullable": True}
    assert props["c"] == {"anyOf": [{"type": "integer"}, {"type": "string"}],
                          "nullable": True}
    assert props["d"] == {"enum": ["x"], "type": "string"}
    assert props["e"] == {"type": "string", "format": "binary"}
    assert props["f"] == document["components"]["schemas"]["S"]["properties"]["f"]


# --- browser with every outside request refused -------------------------------------------------

@pytest.fixture(scope="module")
def url(tmp_path_factory):
    folder = tmp_path_factory.mktemp("docs")
    checkpoint = save_checkpoint(folder / "model.pt")
    env = {k: v for k, v in os.environ.items() if not k.startswith("INSTSEG_")}
    args = ["instseg_pipeline.commands.serve", "--host", "127.0.0.1", "--checkpoint",
            str(checkpoint), "--device", "cpu", "--threads", "1", "--log-level", "warning"]
    with running(args, folder / "server.log", folder, env, "/health", "server") as base:
        yield base


@pytest.fixture
def page(tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: run `bash scripts/install_chromium.sh`")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True,
            args=CHROMIUM_ARGS)
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


@pytest.mark.slow
def test_swagger_ui_renders_segment_offline(url, page):
    refused: list[str] = []
    served: list[str] = []

    def only_local(route):
        if route.request.url.startswith(url):
            served.append(route.request.url)
            route.continue_()
        else:
            refused.append(route.request.url)
            route.abort()

    page.route("**/*", only_local)
    page.goto(f"{url}/docs")
    operation = page.locator(".opblock-summary-path[data-path='/segment']")
    operation.wait_for(timeout=30_000)
    assert operation.inner_text().strip().startswith("/segment")
    assert page.locator(".opblock-summary-method").first.inner_text() in {"GET", "POST"}
    # the rendered page is styled by the local CSS (Swagger's opblock colours)
    post = page.locator(".opblock-post").first
    assert post.evaluate("el => getComputedStyle(el).borderColor") != "rgb(0, 0, 0)"
    assert refused == [], f"/docs asked for outside resources: {refused}"
    assert any(u.endswith(OPENAPI_30) for u in served)
    assert page.locator("text=Unable to render this definition").count() == 0
