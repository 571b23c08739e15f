"""A dataset's upstream targets: which one takes a call, and how each is doing.

A dataset's upstream is its ``upstream_pool`` (several targets serving the
same API, with weights), or ``upstream_url`` alone: one target named
``default``, with no breaker and no retries (a call fails as that upstream
does, as before pools).

- **Choice.** Smooth weighted round robin (nginx's) over the targets that are
  available now: breaker closed, or due for its trial; active checks not
  failing. It is deterministic: over any run of as many calls as the weights
  sum to, each available target takes exactly its weight.
- **Passive health, the breaker.** ``breaker.failures`` failures in a row
  (no connection, a reset or a silence before the answer, a 5xx answer) open
  a target's breaker for ``breaker.open_seconds``; then one call tries it (a
  trial per ``open_seconds``): an answer below 500 closes it, a failure
  keeps it open. A failure after the answer began (a body cut mid-way) is
  the call's, not counted against the target.
- **Active health.** With ``health_check``, ``GET {target}/{path}`` every
  ``interval_seconds``; ``unhealthy_after`` failed checks in a row (no answer
  within ``timeout_seconds``, or 4xx/5xx) take the target out,
  ``healthy_after`` passed ones bring it back and close its breaker.
- **None available.** The call is refused 503 ``upstream-unavailable``
  (``Retry-After``: until the first breaker's trial), forwarded nowhere and
  never charged.
- **Each replica judges on its own**, as Envoy and Kong do: health is not
  shared through Redis; a replica learns of a failing target by its own
  calls and checks.
- **TLS.** ``upstream_tls.ca_pem`` replaces the system's CAs for the
  dataset's targets; ``upstream_tls.client_certificate`` names a certificate
  and key pair of the settings (``proxy.client_certificates``) shown to
  upstreams asking for mutual TLS. Certificates are always verified. A pair
  the settings lack refuses the call (503), failing closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from yarl import URL

from config.settings import Settings
from core.errors import UpstreamUnavailableError
from licensing.catalogue import CatalogueCache, DatasetView

log = logging.getLogger(__name__)
SSLContext = ssl.SSLContext

#: The target of a dataset named by ``upstream_url`` alone.
DEFAULT_TARGET = "default"
#: RFC 9110 §9.2.2: the methods whose repetition has the effect of one call.
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


@dataclass(eq=False, slots=True)
class Target:
    name: str
    #: The base URL without its last slash.
    base: str
    url: URL
    weight: int
    #: Smooth weighted round robin's running weight.
    current: int = 0
    #: Failures in a row (passive).
    failures: int = 0
    #: ``time.monotonic()`` until which the breaker is open (0: closed).
    open_until: float = 0.0
    #: Active checks: failed and passed ones in a row; out of service.
    checks_failed: int = 0
    checks_passed: int = 0
    checked_out: bool = False
    #: When the next active check is due (``time.monotonic()``).
    check_due: float = 0.0

    def available(self, now: float) -> bool:
        return not self.checked_out and (self.open_until == 0.0 or now >= self.open_until)


@dataclass(frozen=True, slots=True)
class Check:
    path: str
    interval: float
    timeout: float
    unhealthy_after: int
    healthy_after: int


@dataclass(eq=False)
class Pool:
    """The targets of one dataset and their health, kept across catalogue
    reloads while the dataset's upstream settings stay the same."""

    dataset_id: str
    #: What the pool was made from: the dataset's upstream settings.
    spec: tuple[Any, ...]
    targets: list[Target]
    retries: int = 0
    #: Failures in a row that open a target's breaker (``None``: no breaker).
    breaker_failures: int | None = None
    open_seconds: float = 30.0
    check: Check | None = None
    #: The TLS context for ``https`` targets (``None``: aiohttp's default).
    ssl: ssl.SSLContext | None = None
    #: Why no call can be forwarded (a client certificate the settings lack).
    broken: str | None = None

    @property
    def tls(self) -> SSLContext | bool:
        """What aiohttp's ``ssl`` takes for these targets (``True``: its default)."""
        return self.ssl if self.ssl is not None else True

    def choose(self, tried: set[str]) -> Target:
        """The target for the next attempt of a call (not one of ``tried``),
        or the problem that refuses it."""
        if self.broken is not None:
            raise UpstreamUnavailableError(f"upstream of {self.dataset_id}: {self.broken}", status=503)
        now = time.monotonic()
        best: Target | None = None
        total = 0
        for target in self.targets:
            if target.name in tried or not target.available(now):
                continue
            target.current += target.weight
            total += target.weight
            if best is None or target.current > best.current:
                best = target
        if best is None:
            raise self._none_available(now)
        best.current -= total
        if best.open_until:
            # Half-open: this call is the trial; the next waits open_seconds.
            best.open_until = now + self.open_seconds
        return best

    def more_to_try(self, tried: set[str]) -> bool:
        """Whether a target not in ``tried`` is available now."""
        now = time.monotonic()
        return any(t.name not in tried and t.available(now) for t in self.targets)

    def _none_available(self, now: float) -> UpstreamUnavailableError:
        waits = [t.open_until - now for t in self.targets if t.open_until and not t.checked_out]
        headers = {"Retry-After": str(max(1, math.ceil(min(waits))))} if waits else None
        return UpstreamUnavailableError(
            f"no upstream target of {self.dataset_id} is available (breakers open or health checks failing)",
            status=503,
            headers=headers,
        )

    def failed(self, target: Target) -> None:
        """A failure of ``target`` before its answer (or a 5xx answer)."""
        if self.breaker_failures is None:
            return
        target.failures += 1
        if target.failures >= self.breaker_failures:
            if not target.open_until:
                log.warning("upstream target %s of %s: breaker open", target.name, self.dataset_id)
            target.open_until = time.monotonic() + self.open_seconds

    def answered(self, target: Target) -> None:
        """``target`` answered (below 500)."""
        if target.open_until:
            log.warning("upstream target %s of %s: breaker closed", target.name, self.dataset_id)
        target.failures = 0
        target.open_until = 0.0

    def checked(self, target: Target, passed: bool) -> None:
        """The outcome of an active check of ``target``."""
        check = self.check
        if check is None:
            return
        if passed:
            target.checks_passed += 1
            target.checks_failed = 0
            if target.checked_out and target.checks_passed >= check.healthy_after:
                log.warning("upstream target %s of %s: health checks pass", target.name, self.dataset_id)
                target.checked_out = False
                self.answered(target)
        else:
            target.checks_failed += 1
            target.checks_passed = 0
            if not target.checked_out and target.checks_failed >= check.unhealthy_after:
                log.warning("upstream target %s of %s: health checks fail", target.name, self.dataset_id)
                target.checked_out = True

    def may_retry(self, method: str, replayable: bool) -> int:
        """How many further targets a call may try."""
        return self.retries if replayable and method in IDEMPOTENT and len(self.targets) > 1 else 0


def _spec(dataset: DatasetView) -> tuple[Any, ...]:
    return (str(dataset.upstream), _frozen(dataset.upstream_pool), _frozen(dataset.upstream_tls))


def _frozen(value: Any) -> Any:
    if isinstance(value, Mapping):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    return value


def _ssl_context(
    tls: Mapping[str, Any] | None, settings: Settings
) -> tuple[ssl.SSLContext | None, str | None]:
    if not tls:
        return None, None
    ca_pem = tls.get("ca_pem")
    try:
        context = ssl.create_default_context(cadata=ca_pem) if ca_pem else ssl.create_default_context()
    except ssl.SSLError as exc:
        log.error("the CA bundle of a dataset cannot be loaded: %s", exc)
        return None, "its CA bundle cannot be loaded"
    name = tls.get("client_certificate")
    if name:
        pair = settings.proxy.client_certificates.get(name)
        if pair is None:
            return None, f"client certificate {name!r} is not in this gateway's settings"
        try:
            context.load_cert_chain(pair.cert_file, pair.key_file)
        except (OSError, ssl.SSLError) as exc:
            log.error("client certificate %s cannot be loaded: %s", name, exc)
            return None, f"client certificate {name!r} cannot be loaded"
    return context, None


def make_pool(dataset: DatasetView, settings: Settings, kept: Pool | None = None) -> Pool:
    """The pool of ``dataset``; the health of ``kept``'s targets carries over
    to targets of the same name and URL."""
    spec = _spec(dataset)
    context, broken = _ssl_context(dataset.upstream_tls, settings)
    config = dataset.upstream_pool
    if config is None:
        base = str(dataset.upstream).rstrip("/")
        targets = [Target(DEFAULT_TARGET, base, URL(base), 1)]
        pool = Pool(dataset.id, spec, targets, ssl=context, broken=broken)
    else:
        targets = [
            Target(
                str(t["name"]), str(t["url"]).rstrip("/"), URL(str(t["url"]).rstrip("/")), int(t["weight"])
            )
            for t in config["targets"]
        ]
        check = config.get("health_check")
        pool = Pool(
            dataset.id,
            spec,
            targets,
            retries=int(config.get("retries", 0)),
            breaker_failures=int(config["breaker"]["failures"]),
            open_seconds=float(config["breaker"]["open_seconds"]),
            check=None
            if check is None
            else Check(
                path=str(check["path"]),
                interval=float(check["interval_seconds"]),
                timeout=float(check["timeout_seconds"]),
                unhealthy_after=int(check["unhealthy_after"]),
                healthy_after=int(check["healthy_after"]),
            ),
            ssl=context,
            broken=broken,
        )
    if kept is not None:
        before = {(t.name, t.base): t for t in kept.targets}
        for target in pool.targets:
            old = before.get((target.name, target.base))
            if old is not None:
                target.failures, target.open_until = old.failures, old.open_until
                target.checks_failed, target.checks_passed = old.checks_failed, old.checks_passed
                target.checked_out, target.check_due = old.checked_out, old.check_due
    return pool


class Pools:
    """Every dataset's pool in this process, made on first use and remade
    when the dataset's upstream settings change."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._pools: dict[str, Pool] = {}

    def of(self, dataset: DatasetView) -> Pool:
        pool = self._pools.get(dataset.id)
        if pool is not None and pool.spec == _spec(dataset):
            return pool
        made = make_pool(dataset, self._settings, pool)
        self._pools[dataset.id] = made
        return made

    async def _check(self, session: aiohttp.ClientSession, pool: Pool, check: Check, target: Target) -> None:
        url = URL(f"{target.base}/{check.path}" if check.path else target.base + "/", encoded=True)
        passed = False
        try:
            async with (
                asyncio.timeout(check.timeout),
                session.get(url, ssl=pool.tls, allow_redirects=False) as answer,
            ):
                passed = answer.status < 400
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
            passed = False
        pool.checked(target, passed)

    @contextlib.asynccontextmanager
    async def checking(
        self, session: aiohttp.ClientSession, catalogue: CatalogueCache
    ) -> AsyncIterator[None]:
        """Run the active health checks of every dataset that asks for them."""
        task = asyncio.create_task(self._check_forever(session, catalogue), name="pdg-upstream-checks")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _check_forever(self, session: aiohttp.ClientSession, catalogue: CatalogueCache) -> None:
        running: set[asyncio.Task[None]] = set()
        try:
            while True:
                now = time.monotonic()
                for dataset in catalogue.current.datasets.values():
                    pool_config = dataset.upstream_pool
                    if not pool_config or not pool_config.get("health_check"):
                        continue
                    pool = self.of(dataset)
                    check = pool.check
                    if check is None or pool.broken is not None:
                        continue
                    for target in pool.targets:
                        if target.check_due <= now:
                            target.check_due = now + check.interval
                            task = asyncio.create_task(self._check(session, pool, check, target))
                            running.add(task)
                            task.add_done_callback(running.discard)
                await asyncio.sleep(0.25)
        finally:
            for task in running:
                task.cancel()
