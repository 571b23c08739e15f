"""Tracing calls: one by ``call_id``, or pages of them by filters."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from pydantic import AwareDatetime, BaseModel
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from core.errors import ValidationFailedError
from ledger.audit.common import _CALLS, public_json

MAX_PAGE: Final = 1000


class CallRecord(BaseModel):
    """A call record (DESIGN §5): every hashed field, its chain ``hash``, and
    the charge in fen (``charge_e4`` is 1/10000 fen)."""

    seq: int
    call_id: str
    request_id: str
    time: AwareDatetime
    started_at: AwareDatetime
    app_id: str
    licensee_id: str
    licence_id: str
    dataset_id: str
    purpose: str
    method: str
    path: str
    query_digest: str | None
    status: int
    upstream_status: int | None
    outcome: str
    problem: str | None
    records: int
    bytes: int
    latency_us: int
    pool: str | None
    period: str
    charge_e4: int
    client_address: str
    token_id: str
    response_digest: str | None
    #: The version of the dataset's terms the call was charged under.
    terms_version: int | None = None
    #: The upstream target that answered (or was tried last); null when
    #: nothing was forwarded.
    upstream_target: str | None = None
    hash: str
    charge_fen: str


def parse_time(value: str, field: str) -> datetime:
    """An RFC 3339 time with a zone, as UTC (a 400 naming ``field`` otherwise)."""
    # An unescaped "+" in a URL query arrives as a space: "...T08:00:00 08:00".
    text = re.sub(r" (\d\d(:?\d\d)?)$", r"+\1", value.strip())
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        raise ValidationFailedError(
            field, f"{value!r} is not an RFC 3339 time with a zone, e.g. 2026-03-01T00:00:00Z"
        )
    return parsed.astimezone(UTC)


def parse_int(value: str, field: str, low: int, high: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ValidationFailedError(field, f"{value!r} is not a whole number") from None
    if not low <= number <= high:
        raise ValidationFailedError(field, f"must be between {low} and {high}")
    return number


@dataclass(frozen=True, slots=True)
class CallQuery:
    """Which calls to list: all filters optional, ``since`` inclusive, ``until``
    exclusive, oldest first; ``after`` is the ``seq`` cursor of the previous page."""

    request_id: str | None = None
    licensee: str | None = None
    dataset: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    after: int = 0
    limit: int = 100

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> CallQuery:
        """From query parameters (``from``/``to``/``after``/``limit``...); bad
        values raise a 400 naming the parameter."""
        since = parse_time(params["from"], "from") if params.get("from") else None
        until = parse_time(params["to"], "to") if params.get("to") else None
        if since is not None and until is not None and until <= since:
            raise ValidationFailedError("to", "must be after from")
        for name in ("licensee", "dataset", "request_id"):
            if len(params.get(name, "")) > 128:
                raise ValidationFailedError(name, "at most 128 characters")
        return cls(
            request_id=params.get("request_id") or None,
            licensee=params.get("licensee") or None,
            dataset=params.get("dataset") or None,
            since=since,
            until=until,
            after=parse_int(params["after"], "after", 0, 2**63 - 1) if params.get("after") else 0,
            limit=parse_int(params["limit"], "limit", 1, MAX_PAGE) if params.get("limit") else 100,
        )


@dataclass(frozen=True, slots=True)
class CallPage:
    calls: list[dict[str, Any]]
    #: Pass as ``after`` for the next page; ``None`` on the last page.
    next_after: int | None


async def get_call(engine: AsyncEngine, call_id: str) -> dict[str, Any] | None:
    async with engine.connect() as conn:
        row = (await conn.execute(select(_CALLS).where(_CALLS.c.call_id == call_id))).first()
    return None if row is None else public_json(row._mapping)


async def find_calls(engine: AsyncEngine, query: CallQuery) -> CallPage:
    stmt = select(_CALLS).where(_CALLS.c.seq > query.after)
    if query.request_id is not None:
        stmt = stmt.where(_CALLS.c.request_id == query.request_id)
    if query.licensee is not None:
        stmt = stmt.where(_CALLS.c.licensee_id == query.licensee)
    if query.dataset is not None:
        stmt = stmt.where(_CALLS.c.dataset_id == query.dataset)
    if query.since is not None:
        stmt = stmt.where(_CALLS.c.time >= query.since)
    if query.until is not None:
        stmt = stmt.where(_CALLS.c.time < query.until)
    async with engine.connect() as conn:
        rows = (await conn.execute(stmt.order_by(_CALLS.c.seq).limit(query.limit + 1))).all()
    calls = [public_json(row._mapping) for row in rows[: query.limit]]
    more = len(rows) > query.limit
    return CallPage(calls, calls[-1]["seq"] if more and calls else None)
