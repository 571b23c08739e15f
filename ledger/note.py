"""Signed notes (c2sp.org/signed-note), checkpoints (c2sp.org/tlog-checkpoint)
and witness cosignatures (c2sp.org/tlog-cosignature, Ed25519 ``cosignature/v1``).

A checkpoint is the note text ``<origin>\\n<tree size>\\n<base64 root>\\n``,
then a blank line, then signature lines ``— <key name> <base64(key ID ||
signature)>``. The log signs with Ed25519 (signature type ``0x01``): key ID =
``SHA-256(name || 0x0A || 0x01 || public key)[:4]``. A witness cosigns with
type ``0x04``: the signature is ``key ID || timestamp (u64, big-endian) ||
Ed25519("cosignature/v1\\ntime <timestamp>\\n" || note text)``.

A verifier key ("vkey") is ``<name>+<key ID, 8 hex digits>+<base64(type ||
public key)>``; it is how a witness learns, out of band, which key to trust.

Parsing is strict: UTF-8 without control characters other than newline, the
three checkpoint lines exactly (no extension lines), a decimal size without
leading zeros, a 32-byte root, at most 16 signature lines. Signatures by keys
not asked for are ignored, as the spec says; a note with no valid signature
of the trusted key is refused.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

ED25519 = 0x01
COSIGNATURE = 0x04
_DASH = "\u2014 "
_MAX_SIGNATURES = 16
_NAME = re.compile(r"[^\s+]+")
_SIZE = re.compile(r"0|[1-9][0-9]{0,18}")


class NoteError(ValueError):
    """A note, checkpoint or key that is malformed or does not verify."""


def b64(raw: bytes) -> str:
    """Standard base64 (RFC 4648 §4), as notes and proofs carry hashes."""
    return base64.b64encode(raw).decode("ascii")


def unb64(text: str) -> bytes:
    """The inverse of :func:`b64`; NoteError for anything else."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise NoteError("not standard base64") from exc


def _raw_public(key: ed25519.Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def key_id(name: str, kind: int, public: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + bytes([kind]) + public).digest()[:4]


@dataclass(frozen=True, slots=True)
class Verifier:
    """A trusted key: its name, type and raw Ed25519 public key."""

    name: str
    kind: int
    public: bytes

    @property
    def id(self) -> bytes:
        return key_id(self.name, self.kind, self.public)

    @property
    def vkey(self) -> str:
        return f"{self.name}+{self.id.hex()}+{b64(bytes([self.kind]) + self.public)}"

    @classmethod
    def parse(cls, vkey: str) -> Verifier:
        name, sep, rest = vkey.strip().partition("+")
        hex_id, sep2, encoded = rest.partition("+")
        if not (sep and sep2) or not _NAME.fullmatch(name) or not re.fullmatch(r"[0-9a-f]{8}", hex_id):
            raise NoteError("a verifier key is <name>+<8 hex digits>+<base64 key>")
        raw = unb64(encoded)
        if len(raw) != 33 or raw[0] not in (ED25519, COSIGNATURE):
            raise NoteError("a verifier key here is an Ed25519 key (type 0x01 or 0x04)")
        verifier = cls(name, raw[0], raw[1:])
        if verifier.id.hex() != hex_id:
            raise NoteError("the verifier key's ID does not match its key")
        return verifier

    def check(self, text: str, signature: bytes) -> bool:
        """Whether ``signature`` (without the key ID) signs ``text``."""
        key = ed25519.Ed25519PublicKey.from_public_bytes(self.public)
        message = text.encode()
        if self.kind == COSIGNATURE:
            if len(signature) != 8 + 64:
                return False
            stamp = int.from_bytes(signature[:8], "big")
            message = f"cosignature/v1\ntime {stamp}\n".encode() + message
            signature = signature[8:]
        try:
            key.verify(signature, message)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True, slots=True)
class Signer:
    """An Ed25519 key that signs notes (``ED25519``) or cosigns checkpoints
    (``COSIGNATURE``)."""

    name: str
    key: ed25519.Ed25519PrivateKey
    kind: int = ED25519

    @property
    def verifier(self) -> Verifier:
        return Verifier(self.name, self.kind, _raw_public(self.key.public_key()))

    def line(self, text: str, *, timestamp: int | None = None) -> str:
        """The signature line of ``text`` (a cosignature carries ``timestamp``)."""
        if self.kind == COSIGNATURE:
            if timestamp is None or not 0 <= timestamp < 2**63:
                raise ValueError("a cosignature needs its POSIX timestamp")
            stamp = timestamp.to_bytes(8, "big")
            body = stamp + self.key.sign(f"cosignature/v1\ntime {timestamp}\n".encode() + text.encode())
        else:
            body = self.key.sign(text.encode())
        return f"{_DASH}{self.name} {b64(self.verifier.id + body)}\n"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes

    @property
    def text(self) -> str:
        return f"{self.origin}\n{self.size}\n{b64(self.root)}\n"

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        lines = text.split("\n")
        if len(lines) != 4 or lines[3] != "":
            raise NoteError("a checkpoint here is exactly origin, size and root, each on a line")
        origin, size, root = lines[:3]
        if not origin or not _SIZE.fullmatch(size):
            raise NoteError(
                "a checkpoint's origin is not empty and its size is a decimal without leading zeros"
            )
        raw = unb64(root)
        if len(raw) != 32:
            raise NoteError("a checkpoint's root is 32 bytes")
        return cls(origin, int(size), raw)


def signer_from_file(path: Path, name: str, kind: int = ED25519) -> Signer:
    """The Ed25519 key in the PEM file ``path`` (made, 0600, if there is
    none) as a signer named ``name``; NoteError if it holds another key."""
    from licensing.keys import load_or_create_signing_key

    key = load_or_create_signing_key(path, "EdDSA").private_key
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise NoteError(f"{path} must be an Ed25519 key (it signs notes)")
    return Signer(name, key, kind)


def sign(text: str, signer: Signer) -> str:
    """The signed note of ``text`` (which ends in a newline)."""
    return f"{text}\n{signer.line(text)}"


def split(note: str) -> tuple[str, list[tuple[str, bytes, bytes]]]:
    """The text and the ``(name, key ID, signature)`` of each signature line."""
    if any(ord(c) < 0x20 and c != "\n" for c in note):
        raise NoteError("a note holds no control characters but newlines")
    text, sep, block = note.rpartition("\n\n")
    if not sep or not block.endswith("\n"):
        raise NoteError("a note is its text, a blank line and signature lines")
    text += "\n"
    signatures = []
    for line in block[:-1].split("\n"):
        if not line.startswith(_DASH):
            raise NoteError("a signature line starts with an em dash and a space")
        name, sep, encoded = line[len(_DASH) :].partition(" ")
        raw = unb64(encoded)
        if not sep or not _NAME.fullmatch(name) or len(raw) < 5:
            raise NoteError("a signature line is '— <name> <base64>'")
        signatures.append((name, raw[:4], raw[4:]))
    if not signatures or len(signatures) > _MAX_SIGNATURES:
        raise NoteError(f"a note carries 1 to {_MAX_SIGNATURES} signatures")
    return text, signatures


def open_note(note: str, verifier: Verifier) -> str:
    """The text of ``note`` once ``verifier``'s signature on it checks;
    NoteError otherwise (other keys' signatures are ignored)."""
    text, signatures = split(note)
    mine = [sig for name, kid, sig in signatures if name == verifier.name and kid == verifier.id]
    if not mine:
        raise NoteError(f"the note is not signed by {verifier.name}")
    if not all(verifier.check(text, sig) for sig in mine):
        raise NoteError(f"the signature of {verifier.name} on the note does not verify")
    return text


def cosign(note: str, signer: Signer, timestamp: int) -> str:
    """``note`` with ``signer``'s cosignature line appended."""
    text, _ = split(note)
    return note + signer.line(text, timestamp=timestamp)
