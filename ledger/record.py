"""The call record: its fields, and its forms in the log and in the ledger.

A record travels in the log (a Redis stream) as a compact JSON array of its
values in :data:`LOGGED_FIELDS` order (:func:`to_log`), is given its ``seq``
and chain ``hash`` by the writer, and is stored as a row of ``calls``. Its
hashed form (:func:`hashed`) is every column but ``hash``, re-derived from the
row, so the verifier checks what billing and tracing read.

Positional, not an object with names: every byte a gateway appends is written
again to the Redis server's append-only file, and the names were two fifths of
each entry. :func:`from_log` reads an object with the names too.

``terms_version`` and then ``upstream_target`` came last, after ledgers had
records: a record without one (``None``) is hashed without the key
(``ledger.chain.canonical``), so those records verify as they were written,
and log and in-flight entries written before them are read with them
``None``.

While the call is in flight its opening fields (:data:`OPENING_FIELDS`, known
when it is reserved) wait in the in-flight entry the same way
(:func:`opening`), for the writer to record the call ``incomplete`` should its
gateway die.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final

import orjson

from core.money import e4_text
from ledger.chain import require_utc

SERVED: Final = "served"
REFUSED: Final = "refused"
UPSTREAM_FAILURE: Final = "upstream-failure"
INCOMPLETE: Final = "incomplete"
OUTCOMES: Final = (SERVED, REFUSED, UPSTREAM_FAILURE, INCOMPLETE)
#: The ``pool`` of a repeat of an idempotent call already charged: served
#: again, drawn on no pool, never billed.
REPLAY_POOL: Final = "replay"
#: The pool of an ``industrial`` call drawn from a licence's prepaid balance.
PREPAID_POOL: Final = "prepaid"

#: The columns of a record, in table order; all are hashed.
FIELDS: Final[tuple[str, ...]] = (
    "seq",
    "call_id",
    "request_id",
    "time",
    "started_at",
    "app_id",
    "licensee_id",
    "licence_id",
    "dataset_id",
    "purpose",
    "method",
    "path",
    "query_digest",
    "status",
    "upstream_status",
    "outcome",
    "problem",
    "records",
    "bytes",
    "latency_us",
    "pool",
    "period",
    "charge_e4",
    "client_address",
    "token_id",
    "response_digest",
    "terms_version",
    "upstream_target",
)
#: What is known of a call only when it ends.
CLOSING_FIELDS: Final = (
    "time",
    "status",
    "upstream_status",
    "outcome",
    "problem",
    "records",
    "bytes",
    "latency_us",
    "charge_e4",
    "response_digest",
    "upstream_target",
)
#: What is known of it when it is reserved: the others but ``seq``.
OPENING_FIELDS: Final = tuple(name for name in FIELDS[1:] if name not in CLOSING_FIELDS)
#: What the gateway writes to the log, in this order: every field but ``seq``.
LOGGED_FIELDS: Final = (*OPENING_FIELDS, *CLOSING_FIELDS)
_LOGGED: Final = frozenset(LOGGED_FIELDS)
#: The fields of entries written before ``upstream_target``, and before
#: ``terms_version`` too (read with them None).
_BEFORE_TARGET: Final = LOGGED_FIELDS[:-1]
_LEGACY_LOGGED: Final = tuple(name for name in _BEFORE_TARGET if name != "terms_version")
_LEGACY_OPENING: Final = tuple(name for name in OPENING_FIELDS if name != "terms_version")
_LOGGED_VALUES: Final = operator.itemgetter(*LOGGED_FIELDS)
_OPENING_VALUES: Final = operator.itemgetter(*OPENING_FIELDS)
TIME_FIELDS: Final = ("time", "started_at")
#: Column widths that bound what a caller can put in a record.
LIMITS: Final = {"request_id": 128, "dataset_id": 64, "path": 2048, "method": 16, "client_address": 64}


class RecordError(ValueError):
    """A log entry that is not a call record."""


def clip(value: str, field: str) -> str:
    """``value`` cut to the column width of ``field`` (callers choose some values)."""
    limit = LIMITS[field]
    return value if len(value) <= limit else value[:limit]


def to_log(record: Mapping[str, Any]) -> bytes:
    """The bytes a gateway appends to the log for ``record`` (no ``seq``)."""
    return orjson.dumps(_LOGGED_VALUES(record), option=orjson.OPT_UTC_Z)


_CHARGE: Final = LOGGED_FIELDS.index("charge_e4")


def to_log_uncharged(record: Mapping[str, Any]) -> tuple[bytes, int]:
    """:func:`to_log` of ``record`` with its charge left out, and the byte
    offset where the charge goes: a paid call is priced when it is settled, in
    the run that appends its record (``metering/lua/finish.lua`` writes the
    charge in; :func:`with_charge` does the same here)."""
    values = _LOGGED_VALUES(record)
    head = orjson.dumps(values[:_CHARGE], option=orjson.OPT_UTC_Z)[:-1] + b","
    tail = orjson.dumps(values[_CHARGE + 1 :], option=orjson.OPT_UTC_Z)
    return head + b"," + tail[1:], len(head)


def with_charge(entry: bytes, at: int, charge_e4: int) -> bytes:
    """A :func:`to_log_uncharged` entry made whole with its charge."""
    return entry[:at] + str(charge_e4).encode() + entry[at:]


def opening(record: Mapping[str, Any]) -> bytes:
    """The opening fields of ``record``, as its in-flight entry keeps them."""
    return orjson.dumps(_OPENING_VALUES(record), option=orjson.OPT_UTC_Z)


def from_opening(data: bytes | str) -> dict[str, Any]:
    """The opening fields back from :func:`opening`'s bytes (times as text)."""
    try:
        values = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise RecordError(f"not JSON: {exc}") from exc
    if isinstance(values, list) and len(values) == len(_LEGACY_OPENING):
        return {**dict(zip(_LEGACY_OPENING, values, strict=True)), "terms_version": None}
    if not isinstance(values, list) or len(values) != len(OPENING_FIELDS):
        raise RecordError(f"not the {len(OPENING_FIELDS)} opening fields of a call record")
    return dict(zip(OPENING_FIELDS, values, strict=True))


def from_log(data: bytes) -> dict[str, Any]:
    """A record read back from the log, with its times as aware datetimes
    (an object's fields other than the logged ones are dropped)."""
    try:
        record = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise RecordError(f"not JSON: {exc}") from exc
    if isinstance(record, list):
        if len(record) == len(_LEGACY_LOGGED):
            record = {
                **dict(zip(_LEGACY_LOGGED, record, strict=True)),
                "terms_version": None,
                "upstream_target": None,
            }
        elif len(record) == len(_BEFORE_TARGET):
            record = {**dict(zip(_BEFORE_TARGET, record, strict=True)), "upstream_target": None}
        elif len(record) != len(LOGGED_FIELDS):
            raise RecordError(f"{len(record)} values, not the {len(LOGGED_FIELDS)} of a call record")
        else:
            record = dict(zip(LOGGED_FIELDS, record, strict=True))
    elif not isinstance(record, dict):
        raise RecordError("not a JSON array or object")
    elif record.keys() != _LOGGED:
        record.setdefault("terms_version", None)
        record.setdefault("upstream_target", None)
        missing = [name for name in LOGGED_FIELDS if name not in record]
        if missing:
            raise RecordError(f"missing fields: {', '.join(missing)}")
        record = {name: record[name] for name in LOGGED_FIELDS}
    try:
        for name in TIME_FIELDS:
            record[name] = datetime.fromisoformat(record[name])
            require_utc(record[name], name)
    except (TypeError, ValueError) as exc:
        raise RecordError(f"bad time: {exc}") from exc
    return record


def hashed(row: Mapping[str, Any]) -> dict[str, Any]:
    """The hashed form of a stored record: every field but ``hash``."""
    return {name: row[name] for name in FIELDS}


def public(row: Mapping[str, Any]) -> dict[str, Any]:
    """A record as the admin API and ``pdg audit`` show it: every column,
    the charge also in fen (a decimal string: prices have 4 decimal places)."""
    data = {name: row[name] for name in (*FIELDS, "hash")}
    data["charge_fen"] = e4_text(int(row["charge_e4"]))
    return data
