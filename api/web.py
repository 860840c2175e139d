"""GET /: the farm's web app, plain HTML, CSS and JavaScript modules from api/web/, no build step.

The page is a client of the same /v1 API (submit, list, watch, cancel) and of /metrics (the
farm page), in the same process and behind the same auth: where the API answers 401 the page
asks for a key once and sends it as `Authorization: Bearer`. It needs no key itself, like /docs.

    GET /                 index.html
    GET /web/<name>       one of the files in api/web/ (anything else is a 404 problem)

Every answer carries a strict Content-Security-Policy: scripts and styles from this origin only
(no inline script), images from this origin, blob: URLs (result files the page fetched with the
key) and the S3 origin that presigned result URLs point to. The files are not versioned by name,
so they are served with `Cache-Control: no-cache` and an ETag: a browser revalidates (a cheap
304) and never runs a stale app.js against a newer API.
"""

from __future__ import annotations

import hashlib
from http import HTTPStatus
from pathlib import Path
from urllib.parse import urlsplit

from flask import Blueprint, Response, request

from api.openapi import Answer, Operation, Param, add_route
from api.problems import Problem
from core.storage import Storage

WEB_ROOT = Path(__file__).with_name("web")
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
# A job key that any storage can sign or map to a URL, to learn where result URLs point.
_PROBE_KEY = "jobs/" + "0" * 32 + "/grid.png"

INDEX = Operation(
    "webApp",
    "The web app (HTML page)",
    {200: Answer("The web app's page.", content={"text/html": {"schema": {"type": "string"}}})},
)
ASSET = Operation(
    "webAsset",
    "A file of the web app",
    {200: Answer("The file.", content={"*/*": {"schema": {}}})},
    {404: "No such file."},
    parameters=(Param("name", "path", {"type": "string", "examples": ["app.js"]}, required=True),),
)


def content_security_policy(storage: Storage) -> str:
    """The page's policy: everything from this origin, plus blob: images and the origin of
    the storage's result URLs (presigned S3), if it has one."""
    images = ["'self'", "blob:"]
    try:
        parts = urlsplit(storage.url(_PROBE_KEY))
    except Exception:  # no credentials to sign with, say: presigned images then stay blocked
        parts = urlsplit("")
    if parts.scheme in ("http", "https") and parts.netloc:
        images.append(f"{parts.scheme}://{parts.netloc}")
    return (
        "default-src 'none'; script-src 'self'; style-src 'self'; "
        f"img-src {' '.join(images)}; connect-src 'self'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    )


def web_files(root: Path = WEB_ROOT) -> frozenset[str]:
    """The names the app serves: the files directly in `root` with a known content type."""
    return frozenset(
        path.name for path in root.iterdir() if path.is_file() and path.suffix in _CONTENT_TYPES
    )


def create_blueprint(storage: Storage) -> Blueprint:
    blueprint = Blueprint("web", __name__)
    files = web_files()
    policy = content_security_policy(storage)

    def send(name: str) -> Response:
        # Small files, read whole: an ETag of their bytes, and a 304 when it matches.
        data = (WEB_ROOT / name).read_bytes()
        response = Response(data, headers={"Content-Type": _CONTENT_TYPES[Path(name).suffix]})
        response.set_etag(hashlib.sha256(data).hexdigest()[:32])
        response.make_conditional(request)
        response.headers["Cache-Control"] = "no-cache"
        response.headers["Content-Security-Policy"] = policy
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    def index() -> Response:
        """The web app's page."""
        return send("index.html")

    def asset(name: str) -> Response:
        """A file of the web app, by name; nothing outside api/web/ can be named."""
        if name not in files:
            raise Problem(
                HTTPStatus.NOT_FOUND,
                f"the web app has no file {name[:100]!r}; open / for the app",
            )
        return send(name)

    add_route(blueprint, "/", "GET", index, INDEX)
    add_route(blueprint, "/web/<path:name>", "GET", asset, ASSET)
    return blueprint
