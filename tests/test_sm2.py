"""SM2/SM3 (the ``[sm]`` extra): tokens and checkpoints signed with SM2,
checked against a second, independent implementation (gmssl, pure Python,
which shares no code with Tongsuo's C): its signatures verify here and ours
verify there. Every other encoding of a signature is refused, an HMAC made
with the public key never passes, and a wrong known answer stops start-up."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from sqlalchemy import select

from config.settings import load_settings
from core import sm2
from gateway.app import create_app
from gateway.state import TOKENS
from ledger import audit
from ledger.chain import Verifier
from ledger.models import CallRow, CheckpointRow
from ledger.record import hashed
from ledger.store import LedgerStore, checkpoint_of
from licensing.keys import load_or_create_signing_key
from storage import migrate
from storage.db import create_engine
from tests.conftest import Backend, World, make_settings
from tests.test_audit import make_record
from tests.test_data_plane import check_problem
from tests.test_dpop import independent_thumbprint

gmssl_sm2 = pytest.importorskip("gmssl.sm2", reason="gmssl (the test extra) checks SM2 independently")
gmssl_sm3 = pytest.importorskip("gmssl.sm3")
pytest.importorskip("tongsuopy", reason="the [sm] extra is not installed")

WorldFactory = Callable[..., Awaitable[World]]


def b64u(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unb64u(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def gm_public_hex(jwk: dict[str, Any]) -> str:
    return unb64u(jwk["x"]).hex() + unb64u(jwk["y"]).hex()


def gm_verify(jwk: dict[str, Any], signature: bytes, data: bytes) -> bool:
    """gmssl's verdict on a 64-byte ``r || s`` (default signer ID, SM3)."""
    checker = gmssl_sm2.CryptSM2(private_key="", public_key=gm_public_hex(jwk))
    return bool(checker.verify_with_sm3(signature.hex(), data))


def gm_sign(private_value: int, jwk: dict[str, Any], data: bytes) -> bytes:
    signer = gmssl_sm2.CryptSM2(private_key=f"{private_value:064x}", public_key=gm_public_hex(jwk))
    return bytes.fromhex(signer.sign_with_sm3(data))


def resigned(token: str, signature: bytes, **header: Any) -> str:
    head, body, _sig = token.split(".")
    if header:
        head = b64u(json.dumps({**jwt.get_unverified_header(token), **header}).encode())
    return f"{head}.{body}.{b64u(signature)}"


def test_the_known_answers_are_a_second_implementation_s_too() -> None:
    """The self-test's constants are the standard's: gmssl reproduces them
    (SM3 digests; the public key and the signature of the example)."""
    for message, expected in sm2._SM3_KATS:
        assert gmssl_sm3.sm3_hash(list(message)) == expected
    d = f"{sm2._KAT_PRIVATE:064x}"
    x, y = sm2._KAT_PUBLIC
    signer = gmssl_sm2.CryptSM2(private_key=d, public_key=f"{x:064x}{y:064x}")
    assert signer._kg(sm2._KAT_PRIVATE, gmssl_sm2.default_ecc_table["g"]) == f"{x:064x}{y:064x}"
    # The example's ephemeral k gives the example's (r, s).
    k = "59276e27d506861a16680f3ad9c02dccef3cc1fa3cdbe4ce6d54b80deac1bc21"
    r, s = sm2._KAT_SIGNATURE
    assert signer.sign_with_sm3(sm2._KAT_MESSAGE, k) == f"{r:064x}{s:064x}"
    sm2.self_test()


def test_a_wrong_known_answer_stops_start_up(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    r, s = sm2._KAT_SIGNATURE
    monkeypatch.setattr(sm2, "_KAT_SIGNATURE", (r, s ^ 1))
    with pytest.raises(sm2.SMUnavailableError, match="known-answer"):
        sm2.self_test()
    # With the extra installed the gateway runs the self-test at start-up,
    # whether or not its settings ask for SM2.
    for algorithm in ("SM2", "ES256"):
        settings = load_settings(env={}, overrides={"data_dir": str(tmp_path), "tokens.algorithm": algorithm})
        with pytest.raises(sm2.SMUnavailableError):
            create_app(settings)
    monkeypatch.setattr(sm2, "_SM3_KATS", ((b"abc", "00" * 32),))
    monkeypatch.setattr(sm2, "_KAT_SIGNATURE", (r, s))
    with pytest.raises(sm2.SMUnavailableError, match="SM3"):
        sm2.self_test()


def test_without_the_extra_sm2_settings_stop_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sm2, "_ec", None)
    with pytest.raises(sm2.SMUnavailableError, match=r"\[sm\] extra"):
        sm2.start(required=True)
    sm2.start(required=False)  # not asked for: nothing to do


async def test_sm2_tokens_round_trip_and_cross_verify(world_factory: WorldFactory) -> None:
    world = await world_factory(tokens__algorithm="SM2")
    ds, _lic, _app, token = await world.licensed()
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "SM2"
    async with world.client.get("/.well-known/jwks.json") as resp:
        jwks = {k["kid"]: k for k in (await resp.json())["keys"]}
    jwk = jwks[header["kid"]]
    assert {jwk["kty"], jwk["crv"], jwk["alg"]} == {"EC", "SM2"}
    assert "d" not in jwk
    assert len(unb64u(jwk["x"])) == len(unb64u(jwk["y"])) == 32
    assert header["kid"] == independent_thumbprint(jwk)  # RFC 7638, computed apart

    # Ours verifies in gmssl: 64 bytes of r || s, SM3, the default signer ID.
    signing_input, signature = token.rsplit(".", 1)
    raw = unb64u(signature)
    assert len(raw) == 64
    assert gm_verify(jwk, raw, signing_input.encode())
    assert not gm_verify(jwk, raw, signing_input.encode() + b"x")
    status, body, _ = await world.call(f"/data/{ds['id']}/a", token)
    assert status == 200, body

    # gmssl's signature, with the gateway's key, verifies here.
    private_value = world.app[TOKENS].signing_key.private_key.private_numbers().private_value
    claims = jwt.decode(token, options={"verify_signature": False})
    claims["jti"] = claims["jti"] + "-gm"
    head = b64u(json.dumps(header).encode())
    body_part = b64u(json.dumps(claims).encode())
    foreign = gm_sign(private_value, jwk, f"{head}.{body_part}".encode())
    status, body, _ = await world.call(f"/data/{ds['id']}/b", f"{head}.{body_part}.{b64u(foreign)}")
    assert status == 200, body


async def test_every_other_encoding_and_an_hmac_are_refused(world_factory: WorldFactory) -> None:
    world = await world_factory(tokens__algorithm="SM2")
    ds, _lic, _app, token = await world.licensed()
    signing_input, signature = token.rsplit(".", 1)
    raw = unb64u(signature)
    r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
    public = world.app[TOKENS].signing_key.private_key.public_key()
    public_pem = sm2.public_pem(public)
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    forged = {
        "DER": resigned(token, encode_dss_signature(r, s)),
        "a byte more": resigned(token, raw + b"\x00"),
        "a byte less": resigned(token, raw[1:]),
        "r = 0": resigned(token, bytes(32) + raw[32:]),
        "s = n": resigned(token, raw[:32] + sm2.ORDER.to_bytes(32, "big")),
        "s + n": resigned(token, raw[:32] + (s + sm2.ORDER).to_bytes(33, "big")),
        "r and s swapped": resigned(token, raw[32:] + raw[:32]),
        "HS256 with the public key": resigned(token, mac, alg="HS256"),
        "an HMAC under alg SM2": resigned(token, mac + mac),
        "ES256 named for an SM2 key": resigned(token, raw, alg="ES256"),
        "alg none": resigned(token, b"", alg="none"),
    }
    for why, bad in forged.items():
        status, body, resp = await world.call(f"/data/{ds['id']}/a", bad)
        check_problem(status, body, resp, 401, "invalid-token")
        assert why
        assert "WWW-Authenticate" in resp.headers
    # pyjwt, asked for SM2, refuses the public key's bytes as a key.
    with pytest.raises(jwt.InvalidKeyError):
        jwt.decode(token, public_pem, algorithms=["SM2"])
    status, body, _ = await world.call(f"/data/{ds['id']}/a", token)
    assert status == 200, body


async def test_rotation_to_sm2_keeps_the_ecdsa_tokens_in_flight(world_factory: WorldFactory) -> None:
    world = await world_factory()
    ds, _lic, app, es_token = await world.licensed()
    assert jwt.get_unverified_header(es_token)["alg"] == "ES256"
    rotated = await world.admin_post("/keys/rotate", {"algorithm": "SM2"}, expect=200)
    assert rotated["alg"] == "SM2"
    sm_token = await world.token(app, f"purpose:public-interest dataset:{ds['id']}")
    assert jwt.get_unverified_header(sm_token) == {"alg": "SM2", "kid": rotated["kid"], "typ": "at+jwt"}
    for token in (es_token, sm_token):
        status, body, _ = await world.call(f"/data/{ds['id']}/a", token)
        assert status == 200, body


async def test_checkpoints_signed_with_sm2_verify_here_and_in_gmssl(backend: Backend, tmp_path: Path) -> None:
    settings = make_settings(tmp_path, backend, **{"ledger.signing_algorithm": "SM2"})
    engine = create_engine(backend.database_url)
    try:
        await migrate.upgrade(engine)
        key = load_or_create_signing_key(settings.ledger_key_path, settings.ledger.signing_algorithm)
        assert key.alg == "SM2"
        assert b"BEGIN PRIVATE KEY" in settings.ledger_key_path.read_bytes()
        store = LedgerStore(engine, key, algorithm="sm3", checkpoint_records=50, checkpoint_seconds=3600)
        await store.append([make_record(i) for i in range(1, 121)], "120-0")
        keys = audit.read_public_keys([settings.ledger_key_path])
        assert list(keys) == [key.kid]
        report = await audit.verify(engine, keys)
        assert report.ok, report
        async with engine.connect() as conn:
            cps = [checkpoint_of(r) for r in await conn.execute(select(CheckpointRow))]
            rows = (await conn.execute(select(CallRow).order_by(CallRow.seq))).all()
        assert len(cps) == 2
        assert len(rows) == 120
        for cp in cps:
            assert len(cp.signature) == 64
            assert gm_verify(key.public_jwk, cp.signature, cp.payload())
            assert cp.verify(keys[key.kid])
            r, s = int.from_bytes(cp.signature[:32], "big"), int.from_bytes(cp.signature[32:], "big")
            assert not replace(cp, signature=encode_dss_signature(r, s)).verify(keys[key.kid])
            assert not replace(cp, first_seq=cp.first_seq + 1).verify(keys[key.kid])
        # gmssl's signature of a checkpoint verifies here too.
        private_value = key.private_key.private_numbers().private_value
        theirs = replace(cps[0], signature=gm_sign(private_value, key.public_jwk, cps[0].payload()))
        assert theirs.verify(keys[key.kid])
        # A checkpoint whose signature was edited fails the whole-ledger check.
        flipped = replace(cps[1], signature=cps[1].signature[:-1] + bytes([cps[1].signature[-1] ^ 1]))
        verifier = Verifier("sm3", checkpoints=[cps[0], flipped], public_keys=keys)
        problem = verifier.feed_many((hashed(dict(r._mapping)), bytes.fromhex(r.hash)) for r in rows)
        problem = problem or verifier.finish()
        assert problem is not None
        assert (problem.kind, problem.seq) == ("checkpoint", cps[1].first_seq), problem
        assert "bad signature" in problem.reason, problem
    finally:
        await engine.dispose()
