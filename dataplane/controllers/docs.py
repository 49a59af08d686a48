"""The interactive API page: Swagger UI served from the ``swagger-ui-py`` package.

No CDN: the page and every asset it loads come from this server, so it works
on a host with no internet access. URLs are relative, so it also works behind a
reverse proxy that mounts the API under a prefix.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any
from urllib.parse import unquote

from litestar import Controller, Request, Response, get
from litestar.params import FromPath

from dataplane.errors import ApiError

_ASSET_TYPES = {
    "swagger-ui.css": "text/css",
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui-standalone-preset.js": "text/javascript",
    "favicon-32x32.png": "image/png",
    "favicon-16x16.png": "image/png",
}

_PAGE = b"""<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Dataplane API</title>
  <link rel="stylesheet" href="docs/assets/swagger-ui.css">
  <link rel="icon" type="image/png" href="docs/assets/favicon-32x32.png">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="docs/assets/swagger-ui-bundle.js"></script>
  <script src="docs/assets/swagger-ui-standalone-preset.js"></script>
  <script>
    window.ui = SwaggerUIBundle({
      url: "spec.json",
      dom_id: "#swagger-ui",
      deepLinking: true,
      presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
      layout: "BaseLayout",
    });
  </script>
</body>
</html>
"""


@dataclass(frozen=True, slots=True)
class _Asset:
    content: bytes
    etag: str


@cache
def _asset(name: str) -> _Asset:
    content = resources.files("swagger_ui").joinpath("static", name).read_bytes()
    return _Asset(content, '"' + hashlib.sha256(content).hexdigest()[:32] + '"')


class DocsController(Controller):
    @get("/docs", sync_to_thread=False)
    def page(self) -> Response[bytes]:
        return Response(_PAGE, media_type="text/html")

    @get("/docs/assets/{asset:str}", sync_to_thread=False)
    def asset(self, request: Request[Any, Any, Any], asset: FromPath[str]) -> Response[bytes]:
        asset = unquote(asset)
        media_type = _ASSET_TYPES.get(asset)
        if media_type is None:
            raise ApiError(404, "not_found", f"no documentation asset named {asset!r}")
        found = _asset(asset)
        headers = {"ETag": found.etag, "Cache-Control": "public, max-age=86400"}
        if request.headers.get("if-none-match") == found.etag:
            return Response(b"", status_code=304, headers=headers)
        return Response(found.content, media_type=media_type, headers=headers)
