"""The call record's forms: in the log, and while the call is in flight."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from ledger.chain import canonical
from ledger.record import (
    FIELDS,
    LOGGED_FIELDS,
    OPENING_FIELDS,
    RecordError,
    from_log,
    from_opening,
    opening,
    to_log,
)


def record() -> dict[str, Any]:
    started = datetime(2026, 11, 30, 15, 59, 59, 250000, tzinfo=UTC)
    return {
        "call_id": "019cd19c-2fea-7037-b199-6b7e139ec6e3",
        "request_id": "req-1",
        "started_at": started,
        "app_id": "app-1",
        "licensee_id": "licensee-1",
        "licence_id": "licence-1",
        "dataset_id": "weather",
        "purpose": "industrial",
        "method": "GET",
        "path": '/data/weather/a,"b"|c',
        "query_digest": None,
        "pool": "prepaid",
        "period": "2026-11",
        "client_address": "2001:db8::1",
        "token_id": "jti-1",
        "time": datetime(2026, 11, 30, 16, 0, 0, tzinfo=UTC),
        "status": 200,
        "upstream_status": 200,
        "outcome": "served",
        "problem": None,
        "records": 11,
        "bytes": 1041,
        "latency_us": 750000,
        "charge_e4": 10000,
        "response_digest": "ab" * 32,
        "terms_version": 3,
        "upstream_target": "primary",
    }


def test_the_log_holds_every_field_but_seq() -> None:
    assert sorted(LOGGED_FIELDS) == sorted(FIELDS[1:])
    assert LOGGED_FIELDS[: len(OPENING_FIELDS)] == OPENING_FIELDS


def test_a_record_goes_through_the_log_as_its_values() -> None:
    data = to_log(record())
    values = orjson.loads(data)
    assert isinstance(values, list)
    assert len(values) == len(LOGGED_FIELDS)
    assert b'"call_id"' not in data  # values, not names
    assert from_log(data) == record()
    # An entry written as an object (with the names) reads the same.
    named = orjson.dumps(record(), option=orjson.OPT_UTC_Z)
    assert from_log(named) == record()


@pytest.mark.parametrize(
    "entry",
    [
        b"[1, 2, 3]",
        orjson.dumps([*orjson.loads(to_log(record())), "extra"]),
        b'"a string"',
        b"{not json",
        orjson.dumps({k: v for k, v in record().items() if k != "status"}, option=orjson.OPT_UTC_Z),
    ],
)
def test_anything_else_is_not_a_record(entry: bytes) -> None:
    with pytest.raises(RecordError):
        from_log(entry)


def test_bad_times_are_refused() -> None:
    values = orjson.loads(to_log(record()))
    values[LOGGED_FIELDS.index("time")] = "2026-11-30T16:00:00+08:00"
    with pytest.raises(RecordError, match="bad time"):
        from_log(orjson.dumps(values))


def test_the_opening_fields_wait_with_the_reservation() -> None:
    data = opening(record())
    back = from_opening(data)
    assert list(back) == list(OPENING_FIELDS)
    assert back["path"] == record()["path"]
    assert back["started_at"] == "2026-11-30T15:59:59.250000Z"
    with pytest.raises(RecordError):
        from_opening(b'["too", "few"]')
    with pytest.raises(RecordError):
        from_opening(b"{}")


def test_entries_from_before_terms_versions_read_without_one() -> None:
    """Log and in-flight entries written before records named their terms
    version (one value fewer) read with it None; one value more is refused."""
    later = ("terms_version", "upstream_target")
    old = {k: v for k, v in record().items() if k not in later}
    values = [old[name] for name in LOGGED_FIELDS if name not in later]
    back = from_log(orjson.dumps(values, option=orjson.OPT_UTC_Z))
    assert back == {**old, "terms_version": None, "upstream_target": None}
    named = from_log(orjson.dumps(old, option=orjson.OPT_UTC_Z))
    assert named == {**old, "terms_version": None, "upstream_target": None}
    values = orjson.loads(opening(record()))
    opened = [v for v, name in zip(values, OPENING_FIELDS, strict=True) if name != "terms_version"]
    assert from_opening(orjson.dumps(opened))["terms_version"] is None
    assert from_opening(orjson.dumps(opened))["path"] == record()["path"]


def test_a_record_without_terms_version_hashes_as_before_it_existed() -> None:
    """A null terms_version is left out of the hashed bytes (records stored
    before it keep their hashes); any value of it is hashed."""
    with_seq = {**record(), "seq": 7}
    old = {k: v for k, v in with_seq.items() if k != "terms_version"}
    assert canonical({**old, "terms_version": None}) == canonical(old)
    assert b'"terms_version"' not in canonical(old)
    assert b'"terms_version":3' in canonical(with_seq)
    assert canonical({**with_seq, "terms_version": 4}) != canonical(with_seq)
    assert canonical({**with_seq, "terms_version": 0}) != canonical(old)


def test_entries_from_before_upstream_targets_read_without_one() -> None:
    """Log entries written before records named their upstream target (the
    last value) read with it None, and hash as they did: the chain leaves a
    null later key out."""
    old = {k: v for k, v in record().items() if k != "upstream_target"}
    values = [old[name] for name in LOGGED_FIELDS if name != "upstream_target"]
    back = from_log(orjson.dumps(values, option=orjson.OPT_UTC_Z))
    assert back == {**old, "upstream_target": None}
    assert canonical({**back, "seq": 7}) == canonical({**old, "seq": 7})
    assert canonical({**record(), "seq": 7}) != canonical({**old, "seq": 7})
