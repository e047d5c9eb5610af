"""/docs: Swagger UI served from the `swagger-ui-bundle` package, so it renders offline.

FastAPI's own /docs page loads Swagger UI from a CDN (a blank page without network). The
packaged Swagger UI (4.x) reads OpenAPI 3.0 only, while FastAPI writes 3.1, so the page is
given ``/docs-assets/openapi-3.0.json``: the same document with the few 3.1 forms FastAPI
uses rewritten to their 3.0 equivalents. ``/openapi.json`` itself stays 3.1.
"""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

DOCS_ASSETS = "/docs-assets"
OPENAPI_30 = "/docs-openapi-3.0.json"


def add_docs(app: FastAPI) -> None:
    """Swagger UI at /docs with its JS, CSS and icon from the package, ReDoc left off."""
    app.mount(DOCS_ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=OPENAPI_30, title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png")

    async def openapi_30() -> JSONResponse:
        return JSONResponse(to_openapi_30(app.openapi()))

    app.get("/docs", include_in_schema=False)(docs)
    app.get(OPENAPI_30, include_in_schema=False)(openapi_30)


def to_openapi_30(document: dict) -> dict:
    """A copy of an OpenAPI 3.1 ``document`` that OpenAPI 3.0 readers accept.

    Rewrites ``anyOf: [X, {type: null}]`` to X with ``nullable: true`` (``allOf: [X]`` when X
    is a ``$ref``), a string with
    ``contentMediaType`` (an upload) to ``format: binary``, and ``const`` to a one-value
    ``enum``; everything else is kept as is.
    """
    return {**_schema_30(document), "openapi": "3.0.3"}


def _schema_30(node):
    if isinstance(node, list):
        return [_schema_30(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _schema_30(value) for key, value in node.items()}
    options = node.get("anyOf")
    if isinstance(options, list) and {"type": "null"} in options:
        rest = [option for option in options if option != {"type": "null"}]
        node.pop("anyOf")
        # 3.0 ignores the siblings of a $ref, so a nullable reference goes through allOf
        single = len(rest) == 1 and "$ref" not in rest[0]
        node.update(rest[0] if single else {"allOf" if len(rest) == 1 else "anyOf": rest})
        node["nullable"] = True
    if node.get("type") == "string" and "contentMediaType" in node:
        node.pop("contentMediaType")
        node["format"] = "binary"
    if "const" in node:
        node["enum"] = [node.pop("const")]
    return node
