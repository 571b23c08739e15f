"""Call ids are RFC 9562 UUIDv7: valid, unique, ordered by time."""

from __future__ import annotations

import time
import uuid

from licensing.ids import new_call_id, new_id


def test_call_ids_are_uuid7_and_time_ordered() -> None:
    ids = []
    for _ in range(200):
        ids.append(new_call_id())
        time.sleep(0.0005)
    for text in ids:
        parsed = uuid.UUID(text)
        assert parsed.version == 7
        assert parsed.variant == uuid.RFC_4122
        assert str(parsed) == text
    assert len(set(ids)) == len(ids)
    millis = [uuid.UUID(i).int >> 80 for i in ids]
    assert millis == sorted(millis)
    assert abs(millis[-1] - time.time() * 1000) < 5000


def test_resource_ids() -> None:
    first, second = new_id("licence"), new_id("licence")
    assert first.startswith("licence-")
    assert len(first) == len("licence-") + 12
    assert first != second
