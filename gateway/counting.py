"""Counting the records of a response body as it streams (DESIGN §5: records
are the upstream's ``X-Record-Count``, else counted from a JSON array).

:class:`RecordCounter` is fed the body chunk by chunk and counts the elements
of a top-level JSON array exactly, whatever the body's size, holding no more
than a few bytes between chunks (a pending backslash, and the brackets still
open below the top level, at most ``max_depth``). A top-level object is one
record; anything else (not JSON, a scalar, a body that is not a well-formed
array) is none.

How: each chunk is reduced with C-speed byte operations: escapes are dropped,
then everything but ``[ ] { } , "``; adjacent quotes go in pairs (they leave
every other byte inside or outside a string as it was), and what is left
inside strings is cut out, leaving the structure alone; balanced brackets
are then folded away, innermost first (a few regular-expression passes, then,
for deep nesting, one linear pass), so what remains at the top level is the
commas between elements, perhaps followed by the one element still open. An
element is counted where it begins (the first, or after a top-level comma),
so the running :attr:`RecordCounter.count` can stop a response as soon as it
passes a bound.

The array's structure is checked (brackets balance and match, nothing follows
the array), not its scalars: ``[tru, 1]`` is two records, ``[1, ]`` too.
"""

from __future__ import annotations

import re

_WHITESPACE = b" \t\r\n"
#: Every byte but the structure and the quote.
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'[]{},"')
_FLAT = rb"\[,*\]|\{,*\}"
#: A balanced pair holding nothing or flat pairs (an element and one level in it).
_INNER = re.compile(rb"\[(?:,|" + _FLAT + rb")*\]|\{(?:,|" + _FLAT + rb")*\}")
_BRACKET = re.compile(rb"[\[\]{}]")
#: Regular-expression passes before a linear fold takes over (deep nesting).
_FOLD_PASSES = 4
_OPENS = {ord("["): ord("]"), ord("{"): ord("}")}
#: Brackets held open between chunks, and nesting within one, by default
#: (``proxy.max_counted_depth``); beyond, no records. orjson, which read whole
#: bodies before, stops at 1024 too.
MAX_DEPTH = 1024


class RecordCounter:
    """The records of one body, fed in chunks: :meth:`feed`, then :meth:`result`."""

    __slots__ = (
        "_backslash",
        "_begun",
        "_broken",
        "_done",
        "_in_string",
        "_stack",
        "_top",
        "count",
        "max_depth",
    )

    def __init__(self, max_depth: int = MAX_DEPTH) -> None:
        #: Elements of the top-level array begun so far.
        self.count = 0
        self.max_depth = max_depth
        self._top: bytes | None = None
        #: Past the first byte inside the top-level array.
        self._begun = False
        #: The brackets open below the top level, outermost first.
        self._stack = b""
        self._in_string = False
        self._backslash = b""
        self._done = False
        self._broken = False

    @property
    def countable(self) -> bool:
        """False once the body is known to be no JSON array or object, or an
        array that is not well formed: its records cannot be counted."""
        return not self._broken and self._top in (None, b"[", b"{")

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
        if b"\\" in data:
            # Backslash pairs first (left to right, as escapes pair), then the
            # escaped quotes; any other escape leaves nothing structural.
            data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
        if not self._begun:
            first = data.lstrip(_WHITESPACE)[:1]
            if not first:
                return
            self._begun = True
            if first != b"]":
                self.count = 1
        text = data.translate(None, _NOT_STRUCTURE).replace(b'""', b"")
        if b'"' in text:
            parts = text.split(b'"')
            text = b"".join(parts[1::2] if self._in_string else parts[0::2])
            self._in_string ^= len(parts) % 2 == 0
        elif self._in_string:
            return
        text = self._stack + text
        folded = _fold(text, self.max_depth)
        if folded is None:
            self._broken = True
            return
        bracket = _BRACKET.search(folded)
        cut = bracket.start() if bracket else len(folded)
        self.count += folded.count(b",", 0, cut)
        rest = folded[cut:]
        if not rest:
            self._stack = b""
        elif rest[:1] in (b"]", b"}"):
            # The top-level array ends here; nothing but whitespace may follow.
            self._done = True
            # Nothing may follow: no structure after the closing bracket (a
            # pair folded away would not show in ``rest``), no other byte
            # after the last "]" (strings and scalars left no structure).
            after = data[data.rfind(b"]") + 1 :]
            self._broken = (
                rest != b"]"
                or text[_top_close(text) + 1 :] != b""
                or self._in_string
                or bool(after.strip(_WHITESPACE))
            )
            self._stack = b""
        else:
            # An element still open: keep its open brackets.
            stack = rest.translate(None, b",")
            if b"]" in stack or b"}" in stack or len(stack) > self.max_depth:
                self._broken = True
                return
            self._stack = stack


def _fold(text: bytes, max_depth: int) -> bytes | None:
    """``text`` with every balanced bracket pair taken out, innermost first:
    a few regular-expression passes (records are shallow), then one linear
    pass however deep the rest is (``None`` if it nests deeper than
    ``max_depth``)."""
    for _ in range(_FOLD_PASSES):
        folded = _INNER.sub(b"", text)
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
            else:
                opens.clear()  # unmatched: nothing around it folds
                out.append(byte)
        else:
            out.append(byte)
    return bytes(out)


def _top_close(text: bytes) -> int:
    """Where the first bracket that closes more than ``text`` opened is."""
    depth = 0
    for index, byte in enumerate(text):
        if byte in _OPENS:
            depth += 1
        elif byte in (0x5D, 0x7D):
            depth -= 1
            if depth < 0:
                return index
    return len(text)
