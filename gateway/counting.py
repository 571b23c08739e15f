"""Counting the records of a response body as it streams (DESIGN §5: records
are the upstream's ``X-Record-Count``, else counted from a JSON array).

:class:`RecordCounter` is fed the body chunk by chunk and counts the elements
of a top-level JSON array exactly, whatever the body's size, holding no more
than a few bytes between chunks (a pending backslash, and the brackets still
open below the top level, at most ``max_depth``). A top-level object is one
record; anything else (not JSON, a scalar, a body that is not a well-formed
array) is none.

How: each chunk is reduced with C-speed byte operations: escapes are dropped,
strings and other scalars become one ``v``, whitespace and ``:`` go, leaving
only ``[ ] { } , v``; balanced innermost brackets are then folded into ``v``
until none is left (a few regular-expression passes, then, for deep nesting,
one linear pass), so what remains at the top level is a run of values and
commas, perhaps followed by the one element still open. Values are counted
where they begin, so the running :attr:`RecordCounter.count` can stop a
response as soon as it passes a bound.

The array's structure is checked (brackets balance and match, nothing follows
the array), not its scalars: ``[tru, 1]`` is two records.
"""

from __future__ import annotations

import re

_WHITESPACE = b" \t\r\n"
_ESCAPE = re.compile(rb"\\.", re.DOTALL)
_STRING = re.compile(rb'"[^"]*"')
_INNER = re.compile(rb"\[[v,]*\]|\{[v,]*\}")
_VALUES = re.compile(rb"v+")
_BRACKET = re.compile(rb"[\[\]{}]")
#: Structure stays, whitespace and ``:`` go, any other byte is (part of) a value.
_TABLE = bytes(b if b in b"[]{},v" else ord("v") for b in range(256))
_DROP = _WHITESPACE + b":"
#: Regular-expression passes before a linear fold takes over (deep nesting).
_FOLD_PASSES = 8
_OPENS = {ord("["): ord("]"), ord("{"): ord("}")}
_V = ord("v")
#: Deeper arrays are not counted (orjson, which read them before, stops at 1024).
MAX_DEPTH = 1024


class RecordCounter:
    """The records of one body, fed in chunks: :meth:`feed`, then :meth:`result`."""

    __slots__ = (
        "_backslash",
        "_broken",
        "_done",
        "_in_string",
        "_stack",
        "_top",
        "_value_open",
        "count",
        "max_depth",
    )

    def __init__(self, max_depth: int = MAX_DEPTH) -> None:
        #: Elements of the top-level array begun so far.
        self.count = 0
        self.max_depth = max_depth
        self._top: bytes | None = None
        #: The brackets open below the top level, outermost first.
        self._stack = b""
        self._in_string = False
        self._backslash = b""
        #: The last top-level byte seen was inside a value that may go on.
        self._value_open = False
        self._done = False
        self._broken = False

    def result(self) -> int:
        """The records of the whole body (call once it has all been fed)."""
        if self._top == b"{":
            return 1
        if self._top == b"[" and self._done and not self._broken:
            return self.count
        return 0

    def feed(self, chunk: bytes) -> None:
        if self._broken or self._top not in (None, b"["):
            return
        if self._done:
            if chunk.strip(_WHITESPACE):
                self._broken = True
            return
        if self._top is None:
            chunk = chunk.lstrip(_WHITESPACE)
            if not chunk:
                return
            self._top = chunk[:1]
            if self._top != b"[":
                return
            chunk = chunk[1:]
        self._feed_array(chunk)

    def _feed_array(self, chunk: bytes) -> None:
        data = self._backslash + chunk
        run = len(data) - len(data.rstrip(b"\\"))
        data, self._backslash = (data[:-1], b"\\") if run % 2 else (data, b"")
        data = _ESCAPE.sub(b"", data)
        if self._in_string:
            end = data.find(b'"')
            if end < 0:
                return
            data = data[end + 1 :]
            self._in_string = False
        data = _STRING.sub(b"v", data)
        quote = data.find(b'"')
        if quote >= 0:
            data = data[:quote] + b"v"
            self._in_string = True
        carried = self._stack
        text = carried + data.translate(_TABLE, _DROP)
        folded = _fold(text, self.max_depth)
        if folded is None:
            self._broken = True
            return
        text = _VALUES.sub(b"v", folded)
        bracket = _BRACKET.search(text)
        cut = bracket.start() if bracket else len(text)
        head, rest = text[:cut], text[cut:]
        values = head.count(b"v")
        # A value begun in an earlier chunk (the element still open then, or
        # a number or string cut by the chunk's end) was counted there.
        if head.startswith(b"v") and (carried or self._value_open):
            values -= 1
        self.count += values
        self._value_open = False
        if not rest:
            self._stack = b""
            self._value_open = head.endswith(b"v")
            return
        if rest[:1] in (b"]", b"}"):
            # The top-level array ends here; nothing but whitespace may follow.
            self._done = True
            self._broken = rest != b"]"
            self._stack = b""
            return
        if head or not carried:
            self.count += 1  # an element begins, not yet closed
        stack = rest.translate(None, b"v,")
        if b"]" in stack or b"}" in stack or len(stack) > self.max_depth:
            self._broken = True
            return
        self._stack = stack


def _fold(text: bytes, max_depth: int) -> bytes | None:
    """``text`` with every balanced innermost bracket pair folded into ``v``,
    again and again: a few regular-expression passes (records are shallow),
    then one linear pass however deep the rest is (``None`` if it nests
    deeper than ``max_depth``)."""
    for _ in range(_FOLD_PASSES):
        folded = _INNER.sub(b"v", text)
        if len(folded) == len(text):
            return text
        text = folded
    out = bytearray()
    opens: list[int] = []
    for byte in text:
        if byte in _OPENS:
            opens.append(len(out))
            if len(opens) > max_depth:
                return None
            out.append(byte)
        elif byte in (0x5D, 0x7D):  # ] }
            if opens and _OPENS[out[opens[-1]]] == byte:
                del out[opens.pop() :]
                out.append(_V)
            else:
                opens.clear()  # unmatched: nothing around it folds
                out.append(byte)
        else:
            out.append(byte)
    return bytes(out)
