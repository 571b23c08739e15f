"""Secrets: generated with ``secrets``, stored only as Argon2id hashes
(argon2-cffi), compared in constant time by the library.

Hashing and verifying are deliberately slow (tens of milliseconds), so the
async callers run them in a worker thread.
"""

from __future__ import annotations

import asyncio
import functools
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

_HASHER = PasswordHasher()


def new_secret(nbytes: int = 32) -> str:
    return secrets.token_urlsafe(nbytes)


def hash_secret(secret: str) -> str:
    return _HASHER.hash(secret)


@functools.cache
def _stand_in_hash() -> str:
    """A hash of a secret nobody knows, with the same parameters as every
    stored one: checked when there is no stored hash, so an unknown id takes
    as long to refuse as a known one with the wrong secret."""
    return _HASHER.hash(new_secret())


def verify_secret(stored_hash: str | None, secret: str) -> bool:
    """Whether ``secret`` matches ``stored_hash``; with no stored hash (an
    unknown id), False after the same work."""
    try:
        matched = _HASHER.verify(stored_hash or _stand_in_hash(), secret)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False
    return matched and stored_hash is not None


async def hash_secret_async(secret: str) -> str:
    return await asyncio.to_thread(hash_secret, secret)


async def verify_secret_async(stored_hash: str | None, secret: str) -> bool:
    return await asyncio.to_thread(verify_secret, stored_hash, secret)
