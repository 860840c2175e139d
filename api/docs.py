"""GET /docs: the OpenAPI document as a web page (Swagger UI), served whole from this server.

The Swagger UI files come from the swagger-ui-bundle-v2 package (Swagger UI 5, the first to
render OpenAPI 3.1) and are served as this blueprint's static folder, so the page fetches
nothing from any other host: no CDN, no validator badge. Like /openapi.json it needs no API key;
"Authorize" in the page takes one for trying the /v1 calls.
"""

from __future__ import annotations

import json
from html import escape

from flask import Blueprint, Response, url_for
from swagger_ui_bundle import swagger_ui_path

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>dalle-farm API</title>
<link rel="stylesheet" href="{css}">
<link rel="icon" type="image/png" href="{icon}">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{js}"></script>
<script>
SwaggerUIBundle({{url: {spec}, dom_id: "#swagger-ui", validatorUrl: null, deepLinking: true}});
</script>
</body>
</html>
"""


def create_blueprint() -> Blueprint:
    blueprint = Blueprint(
        "docs", __name__, static_folder=str(swagger_ui_path), static_url_path="/docs/static"
    )

    @blueprint.get("/docs")
    def docs() -> Response:
        """The Swagger UI page for /openapi.json."""

        def asset(name: str) -> str:
            return escape(url_for("docs.static", filename=name))

        page = _PAGE.format(
            css=asset("swagger-ui.css"),
            icon=asset("favicon-32x32.png"),
            js=asset("swagger-ui-bundle.js"),
            spec=json.dumps(url_for("openapi.openapi")),
        )
        response = Response(page, mimetype="text/html")
        # The page's one inline script is ours; everything else comes from this origin.
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' "
            "'unsafe-inline'; img-src 'self' data:"
        )
        return response

    return blueprint
