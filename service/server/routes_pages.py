"""The pages: the dashboard at / and the API's docs at /docs, both served from the package (no CDN, no build
step), and both open even with --token: the page has to load to ask for the token; the JSON API checks it."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, Response

STATIC = Path(__file__).parent / "static"  # package data: Swagger UI's assets
DASHBOARD = Path(__file__).parent / "dashboard"  # package data: the page at / (no build step, no CDN)

router = APIRouter(include_in_schema=False)


@router.get("/")
def dashboard() -> FileResponse:
    return FileResponse(DASHBOARD / "index.html")


@router.get("/docs")
def docs(request: Request) -> Response:
    return get_swagger_ui_html(
        openapi_url=request.app.openapi_url,
        title="polyak API",
        swagger_js_url="/static/swagger-ui/swagger-ui-bundle.js",
        swagger_css_url="/static/swagger-ui/swagger-ui.css",
        swagger_favicon_url="/static/swagger-ui/favicon-32x32.png",
    )
