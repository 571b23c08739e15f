"""Log lines as JSON (``logging.format = "json"``): one object per line with
``time`` (RFC 3339, UTC, milliseconds), ``level``, ``logger``, ``pid`` (the
process: one of ``pdg serve --workers N``'s workers, the writer) and
``message``, plus the fields a line carries (an access line: ``call_id``,
``request_id``, ``client``, ``method``, ``path``, ``status``, ``outcome``,
``licensee``, ``dataset``, ``bytes``, ``gateway_ms``, and for a served
call ``upstream_ms``, the upstream's time to answer). Only those named
fields are written, so nothing a caller sent (a token, a body, a query)
reaches the log unless a field names it; paths are the masked ones of
``gateway.access_log``.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Final

import orjson

#: The fields a log line may carry besides its message.
FIELDS: Final = (
    "call_id",
    "request_id",
    "client",
    "method",
    "path",
    "status",
    "outcome",
    "licensee",
    "dataset",
    "bytes",
    "gateway_ms",
    "upstream_ms",
)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        entry: dict[str, object] = {
            "time": stamp.replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure(level: str, form: str) -> None:
    """The root logger at ``level``, its handlers writing ``form`` lines."""
    root = logging.getLogger()
    root.setLevel(level)
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    if form == "json":
        for handler in root.handlers:
            handler.setFormatter(JsonFormatter())
