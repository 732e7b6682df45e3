"""``/docs`` without the internet: Swagger UI served from an installed package.

FastAPI's default page loads Swagger UI's script and style from a CDN, so on a machine
without internet access (where endpoints often run) it is blank. Here the same page
points at ``/docs/assets/``, which serves the files that ship inside the
``swagger-ui-py`` wheel (Swagger UI 5, which renders OpenAPI 3.1), imported like any
other dependency (little on top of FastAPI at start-up).
"""

from __future__ import annotations

from pathlib import Path

import swagger_ui
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

from manymodels.errors import BundleError

__all__ = ["ASSETS", "add_docs", "swagger_static_dir"]

#: Where the page's script, style and icon are served from.
ASSETS = "/docs/assets"


def swagger_static_dir() -> Path:
    """The directory of Swagger UI's files inside the installed ``swagger-ui-py``."""
    static = Path(swagger_ui.__file__).parent / "static"
    if not (static / "swagger-ui-bundle.js").is_file():
        raise BundleError(f"Swagger UI's files are missing from {static}; reinstall "
                          f"swagger-ui-py")
    return static


def add_docs(app: FastAPI) -> None:
    """Add ``/docs`` (and its OAuth2 redirect) served from local assets to ``app``
    (created with ``docs_url=None, redoc_url=None``)."""
    app.mount(ASSETS, StaticFiles(directory=swagger_static_dir()), name="docs-assets")
    title = f"{app.title} - docs"

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}", title=title,
            oauth2_redirect_url=f"{root}/docs/oauth2-redirect",
            swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS}/favicon-32x32.png")

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    async def oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()
