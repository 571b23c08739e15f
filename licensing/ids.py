"""Identifiers: readable prefixed ids for resources, UUIDv7 for calls."""

from __future__ import annotations

import os
import secrets
import time


def new_id(prefix: str) -> str:
    """``prefix`` + 12 random hex characters, e.g. ``licence-3f9a1c2b7d10``."""
    return f"{prefix}-{secrets.token_hex(6)}"


def new_call_id() -> str:
    """A UUIDv7 (RFC 9562): time-ordered, so call ids sort by arrival."""
    return uuid7(time.time_ns() // 1_000_000, int.from_bytes(os.urandom(10), "big"))


def uuid7(ms: int, rand: int) -> str:
    """The UUIDv7 of Unix time ``ms`` (milliseconds) and 80 random bits."""
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= ((rand >> 68) & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
