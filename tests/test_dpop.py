"""DPoP (RFC 9449), driven the way a client does it: a key pair of its own,
a proof to the token endpoint for a bound token (``cnf.jkt``), and a fresh
proof with every data call. Every check of RFC 9449 §4.3 has a case that
fails only that check; a refused proof is never forwarded and never recorded
as a served call."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from gateway.state import CATALOGUE
from licensing.dpop import ProofChecker, ProofError, thumbprint, token_hash
from tests.conftest import World
from tests.test_data_plane import check_problem


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def independent_thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 §3, computed here without the product's code: the required
    members in lexicographic order, no whitespace, SHA-256, base64url."""
    required = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n"), "OKP": ("crv", "kty", "x")}
    members = {name: jwk[name] for name in required[jwk["kty"]]}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    return b64(hashlib.sha256(canonical).digest())


#: Sign with the holder's own key.
OWN = object()


class Holder:
    """A client's key pair and the proofs it makes."""

    def __init__(self, kind: str = "ES256") -> None:
        self.alg = kind
        if kind == "ES256":
            self.key: Any = ec.generate_private_key(ec.SECP256R1())
            self.jwk = ECAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        elif kind == "EdDSA":
            self.key = ed25519.Ed25519PrivateKey.generate()
            self.jwk = OKPAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        else:
            self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            self.jwk = RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True)

    @property
    def jkt(self) -> str:
        return independent_thumbprint(self.jwk)

    def proof(
        self,
        method: str,
        url: str,
        *,
        token: str | None = None,
        header: dict[str, Any] | None = None,
        claims: dict[str, Any] | None = None,
        drop: tuple[str, ...] = (),
        signer: Any = OWN,
        alg: str | None = None,
    ) -> str:
        payload: dict[str, Any] = {"jti": str(uuid.uuid4()), "htm": method, "htu": url}
        payload["iat"] = int(time.time())
        if token is not None:
            payload["ath"] = b64(hashlib.sha256(token.encode()).digest())
        payload.update(claims or {})
        for name in drop:
            payload.pop(name, None)
        headers = {"typ": "dpop+jwt", "jwk": self.jwk, **(header or {})}
        headers = {k: v for k, v in headers.items() if v is not None}
        key = self.key if signer is OWN else signer
        return jwt.encode(payload, key, alg or self.alg, headers=headers)


def hmac_forgery(holder: Holder, url: str, token: str) -> str:
    """A proof "signed" HS256 with the holder's public key as the secret (what
    a verifier that takes the key from the header and the alg from the
    attacker would accept). Built by hand: pyjwt refuses to make one."""
    header = {"typ": "dpop+jwt", "alg": "HS256", "jwk": holder.jwk}
    payload = {"jti": str(uuid.uuid4()), "htm": "GET", "htu": url, "iat": int(time.time())}
    payload["ath"] = b64(hashlib.sha256(token.encode()).digest())
    signing_input = ".".join(b64(json.dumps(part).encode()) for part in (header, payload))
    secret = json.dumps(holder.jwk).encode()
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


async def post_token(
    world: World, app: dict[str, Any], scope: str, proof: str | None
) -> tuple[int, dict[str, Any], aiohttp.ClientResponse]:
    raw = f"{app['client_id']}:{app['client_secret']}".encode()
    headers = {"Authorization": "Basic " + base64.b64encode(raw).decode()}
    if proof is not None:
        headers["DPoP"] = proof
    form = {"grant_type": "client_credentials", "scope": scope}
    async with world.client.post("/oauth/token", data=form, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None), resp


async def bound_token(world: World, app: dict[str, Any], scope: str, holder: Holder) -> str:
    url = f"{world.settings.public_url}/oauth/token"
    status, body, _ = await post_token(world, app, scope, holder.proof("POST", url))
    assert status == 200, body
    assert body["token_type"] == "DPoP", body
    return str(body["access_token"])


class Level3:
    """A classification-3 dataset, a licence reaching it and an app."""

    def __init__(self, world: World, ds: dict[str, Any], app: dict[str, Any], scope: str) -> None:
        self.world, self.ds, self.app, self.scope = world, ds, app, scope

    @property
    def path(self) -> str:
        return f"/data/{self.ds['id']}/records"

    @property
    def url(self) -> str:
        return self.world.settings.public_url + self.path

    async def call(self, token: str, proofs: list[str], *, scheme: str = "DPoP") -> tuple[int, Any, Any]:
        headers = [("Authorization", f"{scheme} {token}"), *(("DPoP", p) for p in proofs)]
        async with self.world.client.get(self.path, headers=headers) as resp:
            return resp.status, await resp.json(content_type=None), resp


async def level3(world: World) -> Level3:
    ds = await world.dataset(classification=3)
    licensee = await world.licensee()
    await world.licence(licensee["id"], [ds["id"]], max_classification=3)
    app = await world.app_client(licensee["id"])
    return Level3(world, ds, app, f"purpose:public-interest dataset:{ds['id']}")


def claims_of(token: str) -> dict[str, Any]:
    return dict(jwt.decode(token, options={"verify_signature": False}))


def test_the_thumbprint_is_rfc_7638s() -> None:
    """RFC 7638 §3.1's own example key and thumbprint."""
    example = {
        "kty": "RSA",
        "n": (
            "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECP"
            "ebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY"
            "368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0f"
            "M4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
        ),
        "e": "AQAB",
        "alg": "RS256",
        "kid": "2011-04-29",
    }
    assert thumbprint(example) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    assert independent_thumbprint(example) == thumbprint(example)
    assert token_hash("abc") == b64(hashlib.sha256(b"abc").digest())


@pytest.mark.parametrize("kind", ["ES256", "EdDSA", "PS256"])
async def test_level_3_data_is_served_with_a_bound_token_and_a_fresh_proof(world: World, kind: str) -> None:
    level = await level3(world)
    holder = Holder("RSA" if kind == "PS256" else kind)
    holder.alg = kind
    token = await bound_token(world, level.app, level.scope, holder)
    claims = claims_of(token)
    assert claims["cnf"] == {"jkt": holder.jkt}

    seen = len(world.upstream.seen)
    for _ in range(3):  # a new proof for every call
        status, body, resp = await level.call(token, [holder.proof("GET", level.url, token=token)])
        assert status == 200, body
        assert resp.headers["X-Call-Id"]
    assert len(world.upstream.seen) == seen + 3
    forwarded = {k.lower() for k in world.upstream.last["headers"]}
    assert "dpop" not in forwarded
    assert "authorization" not in forwarded

    # The same token as a Bearer token: refused even where Bearer would do.
    status, body, resp = await level.call(token, [], scheme="Bearer")
    check_problem(status, body, resp, 401, "sender-constraint-failed")
    assert resp.headers["WWW-Authenticate"].startswith("DPoP ")
    assert len(world.upstream.seen) == seen + 3


async def test_bearer_is_refused_at_level_3_and_bound_tokens_need_dpop_elsewhere(world: World) -> None:
    level = await level3(world)
    status, body = await world.token_response(level.app, level.scope)
    assert (status, body["token_type"]) == (200, "Bearer"), body
    bearer = body["access_token"]
    assert "cnf" not in claims_of(bearer)
    status, body, resp = await world.call(level.path, bearer)
    check_problem(status, body, resp, 401, "sender-constraint-failed")
    assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
    # A Bearer token offered under the DPoP scheme, even with a good proof: refused.
    holder = Holder()
    status, body, resp = await level.call(bearer, [holder.proof("GET", level.url, token=bearer)])
    check_problem(status, body, resp, 401, "invalid-token")

    # A level-1 dataset: a bound token still needs its proof there.
    ds, _lic, app, _tok = await world.licensed()
    token = await bound_token(world, app, f"purpose:public-interest dataset:{ds['id']}", holder)
    path = f"/data/{ds['id']}/records"
    status, body, resp = await world.call(path, token)
    check_problem(status, body, resp, 401, "sender-constraint-failed")
    proof = holder.proof("GET", world.settings.public_url + path, token=token)
    status, body, resp = await world.call(path, headers={"Authorization": f"DPoP {token}", "DPoP": proof})
    assert status == 200, body


async def test_every_proof_check_refuses_on_its_own(world: World) -> None:
    """One case per check of RFC 9449 §4.3; each is 401
    ``sender-constraint-failed`` with a DPoP challenge, and nothing reaches
    the upstream."""
    level = await level3(world)
    holder = Holder()
    token = await bound_token(world, level.app, level.scope, holder)
    other = Holder()
    url = level.url
    now = int(time.time())

    def good(**kw: Any) -> str:
        return holder.proof("GET", url, token=token, **kw)

    private_jwk = ECAlgorithm.to_jwk(holder.key, as_dict=True)
    cases: dict[str, tuple[list[str], str]] = {
        "no proof": ([], "is required"),
        "two proofs": ([good(), good()], "exactly one"),
        "not a JWT": (["not.a.jwt"], "well-formed"),
        "typ jwt": ([good(header={"typ": "JWT"})], "typ"),
        "typ missing": ([good(header={"typ": None})], "typ"),
        "alg none": ([holder.proof("GET", url, token=token, signer=None, alg="none")], "alg must be"),
        "HMAC with the public key": ([hmac_forgery(holder, url, token)], "alg must be"),
        "no jwk": ([good(header={"jwk": None})], "public key (jwk)"),
        "private key in jwk": ([good(header={"jwk": private_jwk})], "private key"),
        "jwk of another key": ([good(header={"jwk": other.jwk})], "signature"),
        "alg that does not fit the key": ([good(header={"jwk": Holder("EdDSA").jwk})], "cannot sign"),
        "crit header": ([good(header={"crit": ["exp"], "exp": 1})], ""),
        "jti missing": ([good(drop=("jti",))], "jti"),
        "htm missing": ([good(drop=("htm",))], "htm"),
        "htu missing": ([good(drop=("htu",))], "htu"),
        "iat missing": ([good(drop=("iat",))], "iat"),
        "iat a string": ([good(claims={"iat": str(now)})], "iat"),
        "htm POST": ([holder.proof("POST", url, token=token)], "method"),
        "htm lower case": ([holder.proof("get", url, token=token)], "method"),
        "htu another path": ([holder.proof("GET", url + "-other", token=token)], "htu"),
        "htu another host": (
            [holder.proof("GET", url.replace("127.0.0.1", "localhost"), token=token)],
            "htu",
        ),
        "htu another scheme": ([holder.proof("GET", url.replace("http://", "https://"), token=token)], "htu"),
        "htu relative": ([holder.proof("GET", level.path, token=token)], "htu"),
        "iat too old": ([good(claims={"iat": now - 600})], "older"),
        "iat in the future": ([good(claims={"iat": now + 600})], "future"),
        "ath missing": ([good(drop=("ath",))], "ath"),
        "ath of another token": ([good(claims={"ath": b64(hashlib.sha256(b"other").digest())})], "ath"),
        "a proof by another key": ([other.proof("GET", url, token=token)], "another key"),
    }
    seen = len(world.upstream.seen)
    failures = []
    for name, (proofs, reason) in cases.items():
        status, body, resp = await level.call(token, proofs)
        if status != 401 or body.get("code") != "sender-constraint-failed" or reason not in body["detail"]:
            failures.append(f"{name}: {status} {body}")
            continue
        challenge = resp.headers.get("WWW-Authenticate", "")
        if not challenge.startswith("DPoP ") or "algs=" not in challenge:
            failures.append(f"{name}: challenge {challenge!r}")
    assert not failures, "\n".join(failures)
    assert len(world.upstream.seen) == seen

    # What the checks ignore: the query and fragment of htu, the case of the
    # scheme and host, an explicit default port.
    upper = url.replace("http://127.0.0.1", "HTTP://127.0.0.1")
    for htu in (url + "?a=1#frag", upper):
        status, body, _ = await level.call(token, [holder.proof("GET", htu, token=token)])
        assert status == 200, (htu, body)


async def test_a_replayed_proof_is_refused_on_every_replica(world_factory: Any) -> None:
    first = await world_factory()
    second = await world_factory()  # same database and Redis: another replica
    level = await level3(first)
    holder = Holder()
    token = await bound_token(first, level.app, level.scope, holder)
    proof = holder.proof("GET", level.url, token=token)
    status, body, _ = await level.call(token, [proof])
    assert status == 200, body
    again = Level3(second, level.ds, level.app, level.scope)
    await second.app[CATALOGUE].reload()
    for replica in (level, again):
        status, body, resp = await replica.call(token, [proof])
        check_problem(status, body, resp, 401, "sender-constraint-failed")
        assert "used before" in body["detail"]
    # A fresh proof of the same key is fine on the other replica.
    status, body, _ = await again.call(token, [holder.proof("GET", level.url, token=token)])
    assert status == 200, body


async def test_the_token_endpoint_checks_the_proof_too(world: World) -> None:
    level = await level3(world)
    holder = Holder()
    url = f"{world.settings.public_url}/oauth/token"
    refusals = {
        "for another URL": holder.proof("GET", url),
        "for the data plane": holder.proof("POST", level.url),
        "unsigned": holder.proof("POST", url, signer=None, alg="none"),
    }
    for name, proof in refusals.items():
        status, body, _ = await post_token(world, level.app, level.scope, proof)
        assert (status, body.get("error")) == (400, "invalid_dpop_proof"), (name, body)
    proof = holder.proof("POST", url)
    status, body, _ = await post_token(world, level.app, level.scope, proof)
    assert (status, body["token_type"]) == (200, "DPoP"), body
    status, body, _ = await post_token(world, level.app, level.scope, proof)
    assert (status, body.get("error")) == (400, "invalid_dpop_proof"), body
    async with world.client.get("/.well-known/oauth-authorization-server") as resp:
        metadata = await resp.json()
    assert "ES256" in metadata["dpop_signing_alg_values_supported"]
    assert not {"none", "HS256"} & set(metadata["dpop_signing_alg_values_supported"])


async def test_server_nonces_when_asked_for(world_factory: Any) -> None:
    world = await world_factory(tokens__dpop_nonce=True)
    level = await level3(world)
    holder = Holder()
    url = f"{world.settings.public_url}/oauth/token"
    status, body, resp = await post_token(world, level.app, level.scope, holder.proof("POST", url))
    assert (status, body.get("error")) == (400, "use_dpop_nonce"), body
    nonce = resp.headers["DPoP-Nonce"]
    proof = holder.proof("POST", url, claims={"nonce": nonce})
    status, body, _ = await post_token(world, level.app, level.scope, proof)
    assert status == 200, body
    token = body["access_token"]

    status, body, resp = await level.call(token, [holder.proof("GET", level.url, token=token)])
    check_problem(status, body, resp, 401, "sender-constraint-failed")
    assert 'error="use_dpop_nonce"' in resp.headers["WWW-Authenticate"]
    assert resp.headers["DPoP-Nonce"] == nonce
    wrong = holder.proof("GET", level.url, token=token, claims={"nonce": nonce + "x"})
    status, body, resp = await level.call(token, [wrong])
    check_problem(status, body, resp, 401, "sender-constraint-failed")
    good = holder.proof("GET", level.url, token=token, claims={"nonce": nonce})
    status, body, _ = await level.call(token, [good])
    assert status == 200, body


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def segment(value: Any) -> str:
    return b64(json.dumps(value).encode())


@settings(max_examples=400, derandomize=True, deadline=None, database=None)
@given(
    header=st.fixed_dictionaries(
        {},
        optional={
            "typ": st.sampled_from(["dpop+jwt", "JWT"]) | JSONISH,
            "alg": st.sampled_from(["ES256", "EdDSA", "RS256", "none", "HS256"]) | JSONISH,
            "jwk": st.sampled_from([Holder().jwk, {"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}])
            | st.dictionaries(st.sampled_from(["kty", "crv", "x", "y", "n", "e", "d", "alg"]), JSONISH),
            "crit": JSONISH,
        },
    ),
    claims=JSONISH,
    signature=st.binary(max_size=80),
    raw=st.text(max_size=60),
)
def test_any_proof_is_checked_without_a_crash(
    header: dict[str, Any], claims: Any, signature: bytes, raw: str
) -> None:
    """Hostile headers and claims: the checker answers ``ProofError`` (a 401)
    and nothing else."""
    checker = ProofChecker(public_url="http://gw.test", first_use=always_first)

    async def attempt(value: str) -> None:
        with pytest.raises(ProofError):
            await checker.check([value], method="GET", path="/data/x/y", access_token="t")

    for value in (f"{segment(header)}.{segment(claims)}.{b64(signature)}", raw):
        asyncio.run(attempt(value))


async def always_first(key: str, hash_tag: str, ttl: int) -> bool:
    return True
