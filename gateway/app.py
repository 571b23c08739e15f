"""The application factory: state through ``web.AppKey``, lifetimes in
``cleanup_ctx`` (storage, then Redis, then the call-record log and its
writer, then keys, then the catalogue view, then the upstream client pool),
routes of every surface on one port."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web
from redis.exceptions import RedisClusterException, RedisError

from config.settings import Settings
from core import sm2
from core.errors import ServiceUnavailableError
from gateway import __version__, admin, evidence, health, oauth, proxy
from gateway.call import CallContext, digest_factory
from gateway.listeners import listening
from gateway.metrics import Metrics
from gateway.problems import install_http_layer_problems, name_the_server, problems_middleware
from gateway.revocation import RevocationFeed
from gateway.state import (
    ACCEPTING,
    ADMIN_TOKENS,
    CALLS,
    CATALOGUE,
    CLIENTS,
    CLOCK,
    DPOP,
    ENGINE,
    KEYS,
    METRICS,
    POOLS,
    PRESENCE,
    QUOTA,
    REDIS,
    REGISTRY,
    REPLICA_ID,
    REVOCATIONS,
    SESSIONS,
    SETTINGS,
    THROTTLE,
    TOKENS,
    TRACING,
    UPSTREAM,
    UPSTREAMS,
    Clock,
)
from gateway.throttle import FailureThrottle
from gateway.tracing import tracing_for
from gateway.upstreams import Pools
from ledger.log import Presence, live_replicas
from ledger.writer import start_writer
from licensing.admin_tokens import AdminTokens
from licensing.catalogue import CatalogueCache
from licensing.clients import ClientAuthenticator
from licensing.dpop import Nonces, ProofChecker
from licensing.ids import new_call_id
from licensing.issuers import TrustedIssuers
from licensing.keys import (
    key_store,
    legacy_key,
    load_or_create_signing_key,
    load_public_keys,
    register_public_key,
)
from licensing.personal import PersonalDigest, load_or_create_key
from licensing.registry import Registry
from licensing.tokens import TokenService
from metering.periods import zone
from metering.quota import QuotaBatcher, QuotaStoreError
from storage import migrate
from storage.db import create_engine, session_factory
from storage.redis import COMMAND_TIMEOUT, REDIS_ERRORS, RedisClient, deployment_redis
from storage.tasks import cancel_and_wait

log = logging.getLogger(__name__)


async def _storage(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = create_engine(settings.database_url)
    if settings.server.auto_migrate:
        await migrate.upgrade(engine)
    app[ENGINE] = engine
    app[SESSIONS] = session_factory(engine)
    yield
    await engine.dispose()


async def _redis(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    async with deployment_redis(settings) as client:
        app[REDIS] = client
        quota = QuotaBatcher(client)
        app[QUOTA] = quota
        try:
            yield
        finally:
            await quota.close()


async def _ledger(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    presence = Presence(
        app[REDIS],
        app[REPLICA_ID],
        timeout=settings.ledger.replica_timeout_seconds,
        max_backlog=settings.ledger.max_backlog,
        # Its heartbeat reads the server's clock for the reservations' deadlines.
        clock=app[QUOTA].clock,
    )
    app[PRESENCE] = presence
    app[CALLS] = CallContext(
        quota=app[QUOTA],
        presence=presence,
        clock=app[CLOCK],
        zone=zone(settings.billing.time_zone),
        new_digest=digest_factory(settings.ledger.hash_algorithm),
        replica_id=app[REPLICA_ID],
        personal=PersonalDigest(load_or_create_key(settings.personal_key_path)),
    )
    await presence.start()
    if not settings.ledger.run_writer:
        try:
            yield
        finally:
            await presence.stop()
        return
    async with start_writer(settings, app[ENGINE], app[REDIS], owner=app[REPLICA_ID]):
        try:
            yield
        finally:
            await presence.stop()


class RedisVersionMirror:
    """The catalogue version every replica holds, shared through Redis, so a
    replica that cannot reach the database knows whether its view is still
    current (``CatalogueCache``), and each replica's own (``LOADED``), so a
    change of terms can wait until every live replica has it."""

    KEY = "pdg:catalogue:version"
    LOADED = "pdg:catalogue:loaded"
    _MAX = (
        "if tonumber(ARGV[1]) > tonumber(redis.call('GET', KEYS[1]) or '-1') "
        "then redis.call('SET', KEYS[1], ARGV[1]) end"
    )

    def __init__(self, client: RedisClient, replica_id: str) -> None:
        self.client = client
        self.replica_id = replica_id

    async def publish(self, version: int) -> None:
        async with asyncio.timeout(COMMAND_TIMEOUT):
            await self.client.eval(self._MAX, 1, self.KEY, version)
            await self.client.hset(self.LOADED, self.replica_id, version)

    async def loaded_everywhere(self, version: int) -> bool:
        live = sorted(await live_replicas(self.client))
        if not live:
            return False
        async with asyncio.timeout(COMMAND_TIMEOUT):
            loaded = await self.client.hmget(self.LOADED, live)
        return all(v is not None and int(v) >= version for v in loaded)

    async def forget(self) -> None:
        """This replica leaves (a clean stop)."""
        async with asyncio.timeout(COMMAND_TIMEOUT):
            await self.client.hdel(self.LOADED, self.replica_id)

    async def read(self) -> int | None:
        async with asyncio.timeout(COMMAND_TIMEOUT):
            value = await self.client.get(self.KEY)
        return int(value) if value is not None else None


async def _licensing(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    sessions = app[SESSIONS]
    store = key_store(settings, sessions)
    if store is None:
        key = load_or_create_signing_key(settings.signing_key_path, settings.tokens.algorithm)
        await register_public_key(sessions, key)
    else:
        key = await store.active(first=legacy_key(settings))
    issuers = TrustedIssuers(settings.tokens.issuers)
    tokens = TokenService(
        signing_key=key,
        issuer=settings.issuer,
        audience=settings.audience,
        ttl_seconds=settings.tokens.access_token_ttl_seconds,
        leeway_seconds=settings.tokens.leeway_seconds,
        load_public_keys=(lambda: load_public_keys(sessions)) if store is None else store.public_keys,
        load_active_key=None if store is None else store.active,
        external=issuers,
        resolve_external=lambda identity: oauth.external_claims(
            app[CATALOGUE].fresh(), identity, app[CLOCK].now()
        ),
    )
    await tokens.refresh_keys(force=True)
    app[TOKENS] = tokens
    if store is not None:
        app[KEYS] = store
    redis = app[REDIS]

    def replay_store(kind: str, what: str) -> Callable[[str, str, int], Awaitable[bool]]:
        async def first_use(key: str, hash_tag: str, ttl: int) -> bool:
            # The client id or key thumbprint is the hash tag: replay records
            # spread over a Cluster.
            try:
                async with asyncio.timeout(COMMAND_TIMEOUT):
                    return bool(await redis.set(f"pdg:{{{hash_tag}}}:{kind}:{key}", b"1", nx=True, ex=ttl))
            except REDIS_ERRORS as exc:
                # Without the replay store a one-time value can not be checked
                # for reuse: refuse it rather than accept a possible replay.
                raise ServiceUnavailableError(
                    f"{what} cannot be checked for replay right now", headers={"Retry-After": "1"}
                ) from exc

        return first_use

    app[CLIENTS] = ClientAuthenticator(
        audiences=[f"{settings.public_url}/oauth/token", settings.issuer],
        max_assertion_age=settings.tokens.client_assertion_max_age_seconds,
        first_use=replay_store("assertion", "client assertions"),
    )
    quota = app[QUOTA]

    async def first_proof_use(key: str, hash_tag: str, ttl: int) -> bool:
        # With the batch of reservations in flight: one round trip for all.
        try:
            return await quota.first_use(f"pdg:{{{hash_tag}}}:dpop:{key}", ttl)
        except QuotaStoreError as exc:
            raise ServiceUnavailableError(
                "DPoP proofs cannot be checked for replay right now", headers={"Retry-After": "1"}
            ) from exc

    app[THROTTLE] = FailureThrottle(
        redis,
        per_client=settings.tokens.failures_per_client_per_minute,
        per_address=settings.tokens.failures_per_address_per_minute,
        metrics=app[METRICS],
    )
    app[DPOP] = ProofChecker(
        public_url=settings.public_url,
        first_use=first_proof_use,
        nonces=Nonces(redis, settings.tokens.dpop_nonce_seconds, COMMAND_TIMEOUT)
        if settings.tokens.dpop_nonce
        else None,
        max_age_seconds=settings.tokens.dpop_proof_max_age_seconds,
        leeway_seconds=min(settings.tokens.leeway_seconds, 5),
    )
    mirror = RedisVersionMirror(redis, app[REPLICA_ID])
    cache = CatalogueCache(
        sessions,
        settings.server.catalogue_refresh_seconds,
        mirror,
        degraded_max_seconds=settings.server.degraded_max_seconds,
    )
    app[CATALOGUE] = cache
    app[REGISTRY] = Registry(sessions, on_change=cache.reload, on_terms_change=cache.barrier)
    app[ADMIN_TOKENS] = AdminTokens(sessions)
    interval = settings.server.catalogue_refresh_seconds
    revocations = RevocationFeed(
        redis, tokens, keep_seconds=settings.tokens.access_token_ttl_seconds * 2 + 60
    )
    app[REVOCATIONS] = revocations
    with contextlib.suppress(*REDIS_ERRORS):
        await revocations.poll()  # those still in force, before the first call
    watching = [asyncio.create_task(revocations.watch(interval)), asyncio.create_task(issuers.watch())]
    if store is not None:
        watching.append(asyncio.create_task(tokens.watch(interval)))
    async with cache.running():
        try:
            yield
        finally:
            for task in watching:
                await cancel_and_wait(task)
            with contextlib.suppress(RedisError, RedisClusterException, OSError, TimeoutError):
                await mirror.forget()


async def _tracing(app: web.Application) -> AsyncIterator[None]:
    """Spans still waiting are exported when the gateway stops (first in,
    last out: after the calls in flight and their records)."""
    yield
    await app[TRACING].close()


async def _upstream(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    connector = aiohttp.TCPConnector(
        limit=settings.proxy.pool_size, limit_per_host=0, ttl_dns_cache=60, enable_cleanup_closed=True
    )
    # auto_decompress off: bodies are relayed byte for byte, encoding intact.
    async with aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept"),
    ) as session:
        app[UPSTREAM] = session
        async with app[POOLS].checking(session, app[CATALOGUE]):
            yield


async def _admin_listener(app: web.Application) -> AsyncIterator[None]:
    """``server.admin_listen``: the admin API on an address of its own, served
    by an application that shares this one's state (set up by the contexts
    before this one)."""
    settings = app[SETTINGS]
    address = settings.server.admin_address
    assert address is not None  # noqa: S101 - only registered with one
    listener = web.Application(
        middlewares=[problems_middleware], client_max_size=settings.proxy.max_body_bytes + 1
    )
    for key in app:
        listener[key] = app[key]
    admin.setup(listener)
    async with listening(listener, address, settings.server.workers):
        yield


async def _stop_accepting(app: web.Application) -> None:
    app[ACCEPTING][0] = False


def create_app(settings: Settings) -> web.Application:
    # The SM2/SM3 self-test, with the [sm] extra (start-up fails if it does).
    sm2.start(required=settings.sm2_required)
    app = web.Application(
        middlewares=[problems_middleware],
        client_max_size=settings.proxy.max_body_bytes + 1,
        handler_args={"max_field_size": 16384, "max_line_size": 16384},
    )
    app[SETTINGS] = settings
    app[METRICS] = Metrics(__version__)
    app[TRACING] = tracing_for(settings)
    app[UPSTREAMS] = {}
    app[POOLS] = Pools(settings)
    app[ACCEPTING] = [True]
    app[CLOCK] = Clock()
    app[REPLICA_ID] = new_call_id()
    app.cleanup_ctx.extend([_tracing, _storage, _redis, _ledger, _licensing, _upstream])
    app.on_shutdown.append(_stop_accepting)
    app.on_response_prepare.append(name_the_server)
    install_http_layer_problems()
    proxy.setup(app)
    oauth.setup(app)
    if settings.server.admin_address is None:
        admin.setup(app)
    else:
        app.cleanup_ctx.append(_admin_listener)
    evidence.setup(app)
    health.setup(app)
    if settings.console.enabled:
        from console import web as console_web

        console_web.setup(app)
    return app
