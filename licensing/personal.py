"""Personal data in paths: what the call record keeps of it.

A dataset may mark path segments as personal in its ``paths`` patterns with
``{personal}`` (one non-empty segment, matched like ``*``), e.g.
``persons/{personal}/licences``. The record of a call to such a path keeps
the operation's template with, in place of each personal segment,
``{personal:<digest>}``: the first 32 hex digits of the HMAC-SHA256 of the
segment (percent-decoded) under the deployment's personal-data key. The value
itself is never stored. Whoever holds the key (an auditor asked to find the
calls about one person) computes the digest of the value
(``pdg audit personal-digest VALUE``) and searches
the records for it; without the key, a digest of a short identifier cannot be
turned back into it by trying every value.

A path of such a dataset that matches none of its patterns (refused, 404) is
recorded as ``{unmatched:<digest>}`` of the whole rest. The key is 32 random
bytes in ``ledger.personal_digest_key_file`` (default
``{data_dir}/keys/personal-digest.key``, mode 0600, made on first use); every
replica must read the same one, and it must be kept apart from the ledger.
"""

from __future__ import annotations

import hmac
import os
import secrets
from hashlib import sha256
from pathlib import Path
from urllib.parse import unquote

from licensing.catalogue import PERSONAL, path_matches

_KEY_BYTES = 32
_DIGITS = 32


class PersonalKeyError(Exception):
    """The personal-data key file cannot be read or made (one line, for humans)."""


def read_key(path: Path) -> bytes:
    """The key in ``path``, which must exist (a digest under a new key would
    match nothing)."""
    if not path.exists():
        raise PersonalKeyError(f"no personal-data key at {path} (ledger.personal_digest_key_file)")
    return load_or_create_key(path)


def load_or_create_key(path: Path) -> bytes:
    """The key in ``path``, made (0600, folder 0700) if the file is missing."""
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it a moment ago
            return load_or_create_key(path)
        with os.fdopen(fd, "wb") as out:
            key = secrets.token_bytes(_KEY_BYTES)
            out.write(key)
        return key
    except OSError as exc:
        raise PersonalKeyError(f"cannot read the personal-data key {path}: {exc.strerror}") from exc
    if len(key) < _KEY_BYTES:
        raise PersonalKeyError(f"the personal-data key {path} holds {len(key)} bytes; it needs {_KEY_BYTES}")
    return key


class PersonalDigest:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def of(self, value: str) -> str:
        """The digest a record keeps of one personal value (decoded text)."""
        return hmac.new(self._key, value.encode("utf-8"), sha256).hexdigest()[:_DIGITS]

    def masked(self, patterns: tuple[tuple[str, ...], ...], rest: str) -> str:
        """``rest`` (the path below the dataset, still encoded, no query) as the
        record keeps it under ``patterns`` that mark personal segments."""
        segments = rest.split("/") if rest else []
        decoded = tuple(unquote(s) for s in segments)
        for pattern in patterns:
            if not path_matches(pattern, decoded):
                continue
            out = []
            for i, (raw, value) in enumerate(zip(segments, decoded, strict=True)):
                wanted = pattern[i] if i < len(pattern) else "**"
                out.append(f"{{personal:{self.of(value)}}}" if wanted == PERSONAL else raw)
            return "/".join(out)
        return f"{{unmatched:{self.of(unquote(rest))}}}"
