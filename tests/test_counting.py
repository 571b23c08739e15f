"""Records counted as a body streams (``gateway.counting``): exactly what a
whole-body JSON parse counts, however the body is cut into chunks."""

from __future__ import annotations

import json

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.counting import RecordCounter


def counted(chunks: list[bytes]) -> tuple[int, int]:
    """``(running count after the last chunk, result)``."""
    counter = RecordCounter()
    for chunk in chunks:
        counter.feed(chunk)
    return counter.count, counter.result()


def parsed(body: bytes) -> int:
    """What counting the whole parsed body gives."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return 0
    return len(data) if isinstance(data, list) else 1 if isinstance(data, dict) else 0


def split(body: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(body)) for c in cuts})
    return [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]


tricky_text = st.text(alphabet=st.sampled_from(list('ab"\\[]{},: \n\t/é中\x01')), max_size=12)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), tricky_text
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(tricky_text, inner, max_size=4)),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(st.lists(values, max_size=20), values),
    st.lists(st.integers(min_value=0, max_value=2000), max_size=12),
    st.sampled_from([None, 1, 2]),
)
def test_any_json_any_chunking(value: object, cuts: list[int], indent: int | None) -> None:
    body = json.dumps(value, indent=indent, ensure_ascii=False).encode()
    expected = parsed(body)
    running, result = counted(split(body, cuts))
    assert result == expected, body
    if isinstance(value, list):
        assert running == len(value), body


def test_one_byte_at_a_time() -> None:
    body = json.dumps([{"a": 'x\\"]}', "b": [1, [2, {"c": "}"}]]}, "\\", 12345, [], {}, ""]).encode()
    assert counted([body[i : i + 1] for i in range(len(body))]) == (6, 6)


def test_not_an_array_or_not_well_formed() -> None:
    for body, expected in (
        (b"", 0),
        (b"   ", 0),
        (b'"text"', 0),
        (b"42", 0),
        (b"id,name\n1,a\n", 0),
        (b'  {"a": [1, 2, 3]}', 1),
        (b"[]", 0),
        (b" [ ] ", 0),
        (b"[1, 2, 3] x", 0),  # something follows the array
        (b"[1, 2, 3][4]", 0),
        (b'[1, 2, 3] "x"', 0),
        (b'[1, 2, 3] "]"', 0),
        (b"[1, 2, 3] ]", 0),
        (b'[1, 2, 3] "', 0),
        (b"[1, {2]}", 0),  # brackets that do not match
        (b"[1, 2", 0),  # never closed
        (b"[1, [2, 3]", 0),
        (b'[1, "2]', 0),
    ):
        assert counted([body])[1] == expected, body


def test_the_running_count_sees_an_element_as_it_begins() -> None:
    counter = RecordCounter()
    counter.feed(b'[{"id": 1}, {"id"')
    assert counter.count == 2
    counter.feed(b": 2}, 3")
    assert counter.count == 3
    counter.feed(b"4, 5]")
    assert (counter.count, counter.result()) == (4, 4)


def test_deep_nesting_is_linear_and_bounded() -> None:
    deep = b"[" + b"[" * 5000 + b"]" * 5000 + b", 1]"
    assert counted([deep])[1] == 0  # deeper than orjson reads: not counted
    shallow = b"[" + b"[" * 500 + b"1" + b"]" * 500 + b", 1]"
    assert counted(split(shallow, [100, 700])) == (2, 2)
    assert parsed(shallow) == 2


def test_what_is_held_between_chunks_is_bounded() -> None:
    shallow, deep = RecordCounter(max_depth=3), RecordCounter(max_depth=3)
    for counter, opens in ((shallow, 3), (deep, 4)):
        counter.feed(b"[" + b"[" * opens)
        counter.feed(b"1" + b"]" * opens + b", 2]")
    assert (shallow.result(), deep.result()) == (2, 0)


def test_a_large_array_holds_nothing_between_chunks() -> None:
    element = b'{"id": 123456, "name": "row \\"quoted\\" [x]", "tags": ["a", "b"]}'
    body = b"[" + b",".join([element] * 200_000) + b"]"
    counter = RecordCounter()
    for start in range(0, len(body), 65536):
        counter.feed(body[start : start + 65536])
        assert len(counter._stack) <= 2
    assert counter.result() == 200_000
