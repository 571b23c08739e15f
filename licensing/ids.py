"""Identifiers: readable prefixed ids for resources, UUIDv7 for calls."""

from __future__ import annotations

import os
import secrets
import time


def new_id(prefix: str) -> str:
    """``prefix`` + 12 random hex characters, e.g. ``licence-3f9a1c2b7d10``."""
    return f"{prefix}-{secrets.token_hex(6)}"


def new_call_id() -> str:
    """A UUIDv7 (RFC 9562): time-ordered, so call ids sort by arrival.
    (:func:`uuid7`'s layout, built from bytes: one per data call.)"""
    rand = os.urandom(10)
    h = (
        (time.time_ns() // 1_000_000 & 0xFFFFFFFFFFFF).to_bytes(6, "big")
        + bytes((0x70 | rand[0] & 0x0F, rand[1], 0x80 | rand[2] & 0x3F))
        + rand[3:]
    ).hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def uuid7(ms: int, rand: int) -> str:
    """The UUIDv7 of Unix time ``ms`` (milliseconds) and 80 random bits."""
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= ((rand >> 68) & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
