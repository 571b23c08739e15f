"""SM2 signatures with SM3 (GB/T 32918.2, GB/T 32905): the optional ``[sm]``
extra, for deployments that must sign with national cryptography (国产密码).

The primitives are Tongsuo's (``tongsuopy``, the OpenAtom Foundation's
OpenSSL fork and its ``cryptography``-shaped bindings); this module only
fixes how pdg uses them and writes that down.

**The JOSE profile** (tokens, their JWKS):

- ``alg``: ``"SM2"`` — an SM2 signature over SM3, with ``Z_A`` computed from
  the signer ID below. No other name is accepted for it, and it is accepted
  only for keys on the SM2 curve.
- Signer ID (the ``ID_A`` of ``Z_A``): ``"1234567812345678"``, the default of
  GM/T 0009 / GB/T 35276, fixed; a signature made under any other ID does not
  verify.
- Signature: raw ``r || s``, each 32 bytes big-endian, 64 bytes in all (as
  RFC 7518 §3.4 does for ECDSA), with ``1 <= r, s < n``. DER, a different
  length or anything out of range is refused before the curve is touched.
- Public JWK: ``{"kty": "EC", "crv": "SM2", "x", "y"}``, each coordinate
  base64url of exactly 32 bytes, a point on the curve; the ``kid`` is its
  RFC 7638 thumbprint (members ``crv``, ``kty``, ``x``, ``y``). A JWK with a
  private member (``d``) is refused.
- Keys at rest: PKCS#8 PEM (``id-ecPublicKey`` with the SM2 curve OID
  1.2.156.10197.1.301), encrypted with Tongsuo's best available scheme under
  the key passphrase when one is set; public keys as SubjectPublicKeyInfo PEM.

**Checkpoints** signed with an SM2 ledger key carry the same 64-byte ``r || s``
over the same payload as ECDSA checkpoints.

**The self-test** (:func:`self_test`), run at start-up whenever SM2 is
configured (start-up fails otherwise): SM3 of ``"abc"`` and of ``"abcd" * 16``
(GB/T 32905 Appendix A) through both Tongsuo and ``cryptography`` (which
hashes SM3 ledger chains); the public key derived from the standard's example
private key; the standard's example signature of ``"message digest"``
verified, and refused once the message is changed; a fresh signature verified.

An SM2 verifier is never handed an HMAC: the algorithm is chosen by the
key's entry, never by the token header, and this algorithm refuses every key
that is not an SM2 key object (so a public key's bytes are never a secret).
"""

from __future__ import annotations

import base64
import binascii
import json
from functools import cache
from typing import Any

import jwt
from cryptography.hazmat.primitives import hashes as crypto_hashes
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from jwt.algorithms import Algorithm

ALG = "SM2"
CURVE = "SM2"
SIGNER_ID = b"1234567812345678"
#: The order of the SM2 curve's base point (GB/T 32918.5).
ORDER = int("FFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFF7203DF6B21C6052B53BBF40939D54123", 16)
_SIZE = 32
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})

# GB/T 32905 Appendix A.
_SM3_KATS = (
    (b"abc", "66c7f0f462eeedd9d1f2d46bdc10e4e24167c4875cf2f7a2297da02b8f4ba8e0"),
    (b"abcd" * 16, "debe9ff92275b8a138604889c18e5a4d6fdb70e5387e5765293dcba39c0c5732"),
)
# The example of GB/T 32918.2 on the recommended curve, with the signer ID above.
_KAT_PRIVATE = int("3945208F7B2144B13F36E38AC6D39F95889393692860B51A42FB81EF4DF7C5B8", 16)
_KAT_PUBLIC = (
    int("09F9DF311E5421A150DD7D161E4BC5C672179FAD1833FC076BB08FF356F35020", 16),
    int("CCEA490CE26775A52DC6EA718CC1AA600AED05FBF35E084A6632F6072DA9AD13", 16),
)
_KAT_MESSAGE = b"message digest"
_KAT_SIGNATURE = (
    int("F5A03B0648D2C4630EEAC513E1BB81A15944DA3827D5B74143AC7EACEEE720B3", 16),
    int("B1B6AA29DF212FD8763182BC0D421CA1BB9038FD1F7F42D4840B69C485BBC1AA", 16),
)


class SMUnavailableError(Exception):
    """SM2 is configured but cannot be used here (one line, for humans)."""


try:  # the [sm] extra
    from tongsuopy.crypto import exceptions as _exceptions
    from tongsuopy.crypto import hashes as _hashes
    from tongsuopy.crypto import serialization as _serialization
    from tongsuopy.crypto.asymciphers import ec as _ec
except ImportError:  # pragma: no cover - depends on the installation
    _ec = None


def _tongsuo() -> Any:
    """Tongsuo's ``ec`` module; SMUnavailableError without the extra."""
    if _ec is None:
        raise SMUnavailableError("SM2 needs the [sm] extra: pip install 'public-data-gateway[sm]'")
    return _ec


def available() -> bool:
    return _ec is not None


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: Any) -> bytes:
    if not isinstance(text, str) or "=" in text:
        raise ValueError("not base64url without padding")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def is_private_key(key: Any) -> bool:
    """An SM2 private key (never, without the extra)."""
    return _ec is not None and isinstance(key, _ec.EllipticCurvePrivateKey) and key.curve.name == CURVE


def is_public_key(key: Any) -> bool:
    """An SM2 public key (never, without the extra)."""
    return _ec is not None and isinstance(key, _ec.EllipticCurvePublicKey) and key.curve.name == CURVE


def start(*, required: bool) -> None:
    """At start-up: with the extra installed, the self-test (and pyjwt's
    ``"SM2"``); without it, SMUnavailableError if SM2 is ``required``."""
    if available():
        enable()
    elif required:
        _tongsuo()


def generate_private_key() -> Any:
    ec = _tongsuo()
    return ec.generate_private_key(ec.SM2())


def private_pem(key: Any, passphrase: bytes | None = None) -> bytes:
    _tongsuo()
    s = _serialization
    encryption = s.BestAvailableEncryption(passphrase) if passphrase else s.NoEncryption()
    return bytes(key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, encryption))


def public_pem(key: Any) -> bytes:
    _tongsuo()
    s = _serialization
    return bytes(key.public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo))


def load_private_pem(pem: bytes, passphrase: bytes | None = None) -> Any:
    """An SM2 private key from PKCS#8 PEM; ValueError for anything else."""
    try:
        _tongsuo()
        key = _serialization.load_pem_private_key(pem, password=passphrase)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not an SM2 private key ({exc})") from exc
    if not is_private_key(key):
        raise ValueError("not an SM2 private key")
    return key


def load_public_pem(pem: bytes) -> Any:
    """An SM2 public key from SubjectPublicKeyInfo PEM (or the public half of
    a private PEM); ValueError for anything else."""
    _tongsuo()
    s = _serialization
    try:
        key = (
            s.load_pem_private_key(pem, password=None).public_key()
            if b"PRIVATE KEY" in pem
            else s.load_pem_public_key(pem)
        )
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not an SM2 key ({exc})") from exc
    if not is_public_key(key):
        raise ValueError("not an SM2 key")
    return key


def public_jwk(key: Any) -> dict[str, Any]:
    """The public JWK members of an SM2 key (private or public)."""
    public = key.public_key() if is_private_key(key) else key
    numbers = public.public_numbers()
    return {
        "kty": "EC",
        "crv": CURVE,
        "x": _b64(numbers.x.to_bytes(_SIZE, "big")),
        "y": _b64(numbers.y.to_bytes(_SIZE, "big")),
    }


def key_from_jwk(jwk: Any) -> Any:
    """The SM2 public key of a JWK in the profile; ValueError for anything else."""
    if not isinstance(jwk, dict) or jwk.get("kty") != "EC" or jwk.get("crv") != CURVE:
        raise ValueError("not an SM2 JWK (kty EC, crv SM2)")
    if _PRIVATE_MEMBERS & jwk.keys():
        raise ValueError("an SM2 JWK here holds no private members")
    if jwk.get("alg", ALG) != ALG:
        raise ValueError(f"an SM2 JWK's alg is {ALG}")
    try:
        x, y = _unb64(jwk.get("x")), _unb64(jwk.get("y"))
    except (ValueError, binascii.Error) as exc:
        raise ValueError("an SM2 JWK's x and y are base64url") from exc
    if len(x) != _SIZE or len(y) != _SIZE:
        raise ValueError("an SM2 JWK's x and y are 32 bytes each")
    ec = _tongsuo()
    numbers = ec.EllipticCurvePublicNumbers(int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SM2())
    try:
        return numbers.public_key()
    except (ValueError, TypeError) as exc:  # not on the curve
        raise ValueError("an SM2 JWK's point is not on the curve") from exc


def sign(private_key: Any, data: bytes) -> bytes:
    """The 64-byte ``r || s`` SM2/SM3 signature of ``data``."""
    if not is_private_key(private_key):
        raise TypeError("not an SM2 private key")
    ec = _tongsuo()
    r, s = decode_dss_signature(bytes(private_key.sign(data, ec.ECDSA(_hashes.SM3()))))
    return r.to_bytes(_SIZE, "big") + s.to_bytes(_SIZE, "big")


def verify(public_key: Any, signature: bytes, data: bytes) -> bool:
    """Whether ``signature`` (64-byte ``r || s`` only) is valid for ``data``."""
    if not is_public_key(public_key) or not isinstance(signature, bytes) or len(signature) != 2 * _SIZE:
        return False
    r, s = int.from_bytes(signature[:_SIZE], "big"), int.from_bytes(signature[_SIZE:], "big")
    if not (0 < r < ORDER and 0 < s < ORDER):
        return False
    ec = _tongsuo()
    try:
        public_key.verify(encode_dss_signature(r, s), data, ec.ECDSA(_hashes.SM3()))
    except _exceptions.InvalidSignature:
        return False
    return True


class SM2Algorithm(Algorithm):
    """The profile as a pyjwt algorithm (``jwt.encode``/``decode`` with ``"SM2"``)."""

    def prepare_key(self, key: Any) -> Any:
        if is_private_key(key) or is_public_key(key):
            return key
        raise jwt.InvalidKeyError("SM2 signs and verifies with SM2 key objects only")

    def sign(self, msg: bytes, key: Any) -> bytes:
        return sign(key, msg)

    def verify(self, msg: bytes, key: Any, sig: bytes) -> bool:
        return verify(key.public_key() if is_private_key(key) else key, sig, msg)

    @staticmethod
    def to_jwk(key_obj: Any, as_dict: bool = False) -> Any:
        jwk = public_jwk(key_obj)
        return jwk if as_dict else json.dumps(jwk)

    @staticmethod
    def from_jwk(jwk: str | dict[str, Any]) -> Any:
        return key_from_jwk(json.loads(jwk) if isinstance(jwk, str) else jwk)


def self_test() -> None:
    """The known-answer tests of the module docstring; SMUnavailableError if
    any fails (or the extra is missing)."""
    ec = _tongsuo()
    for message, expected in _SM3_KATS:
        tongsuo = _hashes.Hash(_hashes.SM3())
        tongsuo.update(message)
        openssl = crypto_hashes.Hash(crypto_hashes.SM3())
        openssl.update(message)
        if tongsuo.finalize().hex() != expected or openssl.finalize().hex() != expected:
            raise SMUnavailableError("the SM3 known-answer test failed")
    private = ec.derive_private_key(_KAT_PRIVATE, ec.SM2())
    numbers = private.public_key().public_numbers()
    if (numbers.x, numbers.y) != _KAT_PUBLIC:
        raise SMUnavailableError("the SM2 known-answer test failed (public key)")
    r, s = _KAT_SIGNATURE
    known = r.to_bytes(_SIZE, "big") + s.to_bytes(_SIZE, "big")
    public = private.public_key()
    if not verify(public, known, _KAT_MESSAGE) or verify(public, known, _KAT_MESSAGE + b"!"):
        raise SMUnavailableError("the SM2 known-answer test failed (signature)")
    if not verify(public, sign(private, b"pdg"), b"pdg"):
        raise SMUnavailableError("the SM2 sign-and-verify test failed")


def enable() -> None:
    """Self-test (every time: start-up fails if it does), then register the
    ``"SM2"`` algorithm with pyjwt (once)."""
    self_test()
    _register()


@cache
def _register() -> None:
    jwt.register_algorithm(ALG, SM2Algorithm())
