"""The access log (``logging.access_log``): one line per request, with no
query string and no personal data.

aiohttp's default line holds the request line as sent, query included, and
a query or a path segment may carry personal data (an ID number). This one
logs the path the call record keeps: personal segments as their keyed
digests (``licensing.personal``); a data-plane request that was never
recorded (refused before its token was accepted) as its dataset only.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

#: The call record of a data call (``gateway.proxy``): its ``path``, masked.
RECORD = web.RequestKey("pdg_record", dict)
#: How long the upstream took to answer a served call, in milliseconds.
UPSTREAM_MS = web.RequestKey("pdg_upstream_ms", float)


def logged_path(request: web.BaseRequest) -> str:
    record: dict[str, Any] | None = request.get(RECORD)
    if record is not None:
        return str(record.get("path", ""))
    path = request.rel_url.raw_path
    if path.startswith("/data/"):
        dataset = path.split("/", 3)[2]
        return f"/data/{dataset}/…"
    return path


class AccessLogger(AbstractAccessLogger):
    """A text line, and the same as fields for JSON lines (``gateway.logs``)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        record: dict[str, Any] = request.get(RECORD) or {}
        path = logged_path(request)
        call_id = response.headers.get("X-Call-Id")
        fields = {
            "call_id": call_id,
            "request_id": response.headers.get("X-Request-Id"),
            "client": request.remote,
            "method": request.method,
            "path": path,
            "status": response.status,
            "outcome": record.get("outcome"),
            "licensee": record.get("licensee_id"),
            "dataset": record.get("dataset_id"),
            "bytes": response.body_length,
            "gateway_ms": round(time * 1000, 1),
            "upstream_ms": request.get(UPSTREAM_MS),
        }
        self.logger.info(
            "%s %s %s %d %d %.1fms %s",
            request.remote,
            request.method,
            path,
            response.status,
            response.body_length,
            time * 1000,
            call_id or "-",
            extra=fields,
        )
