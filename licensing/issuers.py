"""The published keys of trusted external issuers (``[[tokens.issuers]]``),
whose access tokens the data plane accepts (``licensing.tokens`` checks the
tokens; this module only keeps their keys).

Fetching
- From ``jwks_url``, or through RFC 8414 discovery: the metadata at
  ``metadata_url`` (else ``/.well-known/oauth-authorization-server`` inserted
  between the issuer's origin and path, RFC 8414 §3) must name the configured
  ``issuer`` exactly (§3.3), and its ``jwks_uri`` is read (https, or http on
  loopback).
- One GET, no redirects, no proxy from the environment, at most
  ``MAX_DOCUMENT_BYTES`` of JSON within ``FETCH_TIMEOUT_SECONDS``.
- Keys are imported with joserfc (authlib's JOSE half). A JWK is kept only
  if it is public (no private members), for signatures (``use`` absent or
  ``sig``; ``key_ops`` absent or holding ``verify``), has a ``kid``, fits at
  least one of the issuer's ``algorithms`` (its own ``alg``, if any, among
  them) and, for RSA, has 2048 bits or more. The others are skipped and
  logged by kid.

Caching, and failing closed
- Keys are used for ``cache_seconds`` after they were fetched, refreshed in
  the background at half of it (:meth:`TrustedIssuers.watch`).
- A token naming a ``kid`` not in the cache refetches the keys, at most once
  per ``refetch_min_seconds`` (one fetch shared by every call that waits), so
  made-up ``kid`` values cannot flood the issuer.
- A failed fetch keeps the keys already known until their time is up. Past
  it, every token of that issuer is refused until a fetch succeeds: keys are
  never trusted longer than ``cache_seconds`` after the issuer last vouched
  for them.
"""

from __future__ import annotations

import asyncio
import logging
import time
import warnings
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import orjson
from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc.errors import JoseError, SecurityWarning
from joserfc.jwk import JWKRegistry

from config.settings import TrustedIssuer
from licensing.clients import MIN_RSA_BITS, PRIVATE_JWK_MEMBERS, algorithms_for

log = logging.getLogger(__name__)

MAX_DOCUMENT_BYTES = 512 * 1024
FETCH_TIMEOUT_SECONDS = 5.0

#: ``fetch(url)``: the JSON object at ``url``; raises :class:`FetchError`.
Fetch = Callable[[str], Awaitable[dict[str, Any]]]


class FetchError(Exception):
    """An issuer's metadata or keys could not be fetched (one line)."""


class KeysUnavailableError(Exception):
    """The issuer's keys have expired from the cache and cannot be fetched."""


def metadata_url(issuer: str) -> str:
    """RFC 8414 §3: the well-known suffix goes between origin and path."""
    parts = urlsplit(issuer)
    path = parts.path.rstrip("/")
    return urlunsplit((parts.scheme, parts.netloc, f"/.well-known/oauth-authorization-server{path}", "", ""))


def _allowed_url(url: Any) -> bool:
    if not isinstance(url, str):
        return False
    parts = urlsplit(url)
    loopback = parts.hostname in ("127.0.0.1", "::1", "localhost")
    return bool(parts.hostname) and (parts.scheme == "https" or (parts.scheme == "http" and loopback))


async def fetch_json(url: str) -> dict[str, Any]:
    """GET a JSON object, bounded in size and time, following no redirect."""
    timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT_SECONDS)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout, trust_env=False) as session,
            session.get(url, allow_redirects=False, headers={"Accept": "application/json"}) as response,
        ):
            if response.status != 200:
                raise FetchError(f"{url} answered {response.status}")
            body = bytearray()
            async for chunk in response.content.iter_chunked(64 * 1024):
                body += chunk
                if len(body) > MAX_DOCUMENT_BYTES:
                    raise FetchError(f"{url} sent more than {MAX_DOCUMENT_BYTES} bytes")
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise FetchError(f"{url} cannot be reached ({type(exc).__name__})") from exc
    try:
        document = orjson.loads(bytes(body))
    except orjson.JSONDecodeError as exc:
        raise FetchError(f"{url} did not send JSON") from exc
    if not isinstance(document, dict):
        raise FetchError(f"{url} did not send a JSON object")
    return document


@dataclass(frozen=True, slots=True)
class IssuerKey:
    """One usable key: the algorithms it may verify, and the key itself."""

    algorithms: frozenset[str]
    key: Any


def usable_keys(jwks: Mapping[str, Any], algorithms: tuple[str, ...], issuer: str) -> dict[str, IssuerKey]:
    """The keys of a JWKS document that pass the rules in the module docstring."""
    found = jwks.get("keys")
    if not isinstance(found, list):
        raise FetchError(f"the keys of {issuer} are not a JWKS (no 'keys' list)")
    keys: dict[str, IssuerKey] = {}
    for jwk in found:
        if not isinstance(jwk, dict):
            continue
        kid = jwk.get("kid")
        fits = [a for a in algorithms_for(jwk) if a in algorithms and jwk.get("alg", a) == a]
        ops = jwk.get("key_ops")
        if (
            not isinstance(kid, str)
            or not kid
            or PRIVATE_JWK_MEMBERS & jwk.keys()
            or jwk.get("use", "sig") != "sig"
            or (ops is not None and (not isinstance(ops, list) or "verify" not in ops))
            or not fits
        ):
            log.warning("skipping key %r of issuer %s: not a usable public signing key", kid, issuer)
            continue
        try:
            # authlib's JOSE half (joserfc) imports and checks the JWK; pyjwt
            # verifies with the key object it holds. A key joserfc warns of
            # (too short) is refused, whatever the process does with warnings.
            with warnings.catch_warnings():
                warnings.simplefilter("error", SecurityWarning)
                imported = JWKRegistry.import_key(jwk)
        except SecurityWarning:
            log.warning("skipping key %r of issuer %s: it is too weak", kid, issuer)
            continue
        except (JoseError, ValueError, TypeError, KeyError):
            log.warning("skipping key %r of issuer %s: it cannot be imported", kid, issuer)
            continue
        if imported.is_private:
            log.warning("skipping key %r of issuer %s: it is a private key", kid, issuer)
            continue
        key = imported.raw_value
        if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
            log.warning("skipping key %r of issuer %s: RSA shorter than %d bits", kid, issuer, MIN_RSA_BITS)
            continue
        keys[kid] = IssuerKey(frozenset(fits), key)
    return keys


class IssuerKeys:
    """The cached keys of one trusted issuer."""

    def __init__(
        self, config: TrustedIssuer, *, fetch: Fetch = fetch_json, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self.issuer = config.issuer
        self._fetch = fetch
        self._clock = clock
        self._keys: dict[str, IssuerKey] = {}
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._pending: asyncio.Future[None] | None = None
        self.failing = False

    @property
    def expired(self) -> bool:
        return self._fetched_at is None or self._clock() - self._fetched_at >= self.config.cache_seconds

    def _may_refetch(self) -> bool:
        last = self._attempted_at
        return last is None or self._clock() - last >= self.config.refetch_min_seconds

    async def _jwks_url(self) -> str:
        if self.config.jwks_url:
            return self.config.jwks_url
        url = self.config.metadata_url or metadata_url(self.issuer)
        metadata = await self._fetch(url)
        if metadata.get("issuer") != self.issuer:
            raise FetchError(f"the metadata at {url} names another issuer than {self.issuer}")
        jwks_uri = metadata.get("jwks_uri")
        if not _allowed_url(jwks_uri):
            raise FetchError(f"the metadata at {url} names no https jwks_uri")
        return str(jwks_uri)

    async def _load(self) -> None:
        self._attempted_at = self._clock()
        try:
            keys = usable_keys(await self._fetch(await self._jwks_url()), self.config.algorithms, self.issuer)
        except FetchError as exc:
            if not self.failing:  # once per outage, not once per try
                log.warning("cannot refresh the keys of issuer %s: %s", self.issuer, exc)
            self.failing = True
            return
        if self.failing:
            log.warning("the keys of issuer %s load again", self.issuer)
        self.failing = False
        self._keys = keys
        self._fetched_at = self._clock()

    async def refresh(self) -> None:
        """Fetch the keys (one fetch shared by every caller that waits)."""
        if self._pending is None or self._pending.done():
            self._pending = asyncio.ensure_future(self._load())
        await asyncio.shield(self._pending)

    async def key(self, kid: str) -> IssuerKey | None:
        """The key named ``kid``; ``None`` if the issuer does not publish it;
        :class:`KeysUnavailableError` when the cache has expired and cannot be renewed."""
        if self.expired and self._may_refetch():
            await self.refresh()
        if self.expired:
            raise KeysUnavailableError(
                f"the keys of issuer {self.issuer} cannot be fetched and the cached ones have expired"
            )
        found = self._keys.get(kid)
        if found is None and self._may_refetch():
            await self.refresh()
            if self.expired:
                raise KeysUnavailableError(f"the keys of issuer {self.issuer} cannot be fetched")
            found = self._keys.get(kid)
        return found


class TrustedIssuers:
    """Every configured issuer's keys, by ``iss``."""

    def __init__(self, configs: tuple[TrustedIssuer, ...], *, fetch: Fetch = fetch_json) -> None:
        self.by_name: dict[str, IssuerKeys] = {c.issuer: IssuerKeys(c, fetch=fetch) for c in configs}

    def get(self, issuer: str) -> IssuerKeys | None:
        return self.by_name.get(issuer)

    async def watch(self) -> None:
        """Refresh each issuer's keys at half their cache time, until cancelled
        (a failure is retried every ``refetch_min_seconds``)."""
        if not self.by_name:
            return
        await asyncio.gather(*(self._watch_one(keys) for keys in self.by_name.values()))

    @staticmethod
    async def _watch_one(keys: IssuerKeys) -> None:
        while True:
            await keys.refresh()
            config = keys.config
            await asyncio.sleep(config.refetch_min_seconds if keys.failing else config.cache_seconds / 2)
