"""The in-memory view of the catalogue, licences and apps that every data call
is checked against, and the rules of DESIGN §3 that decide a call.

The view is immutable and swapped whole. It is rebuilt right after a change
made through this process, and every ``catalogue_refresh_seconds`` a replica
compares the database's catalogue version with its own, so changes made
elsewhere (another replica, the CLI) take effect everywhere within about a
second (DESIGN §7 promises two).

A replica that can not confirm its view (the database is unreachable) does
not keep serving it: once the view is older than the promise allows, data
calls are refused (503) until a refresh succeeds again — a suspension made
meanwhile must not go unnoticed (fail closed, DESIGN §7).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol
from urllib.parse import unquote

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from yarl import URL

from core.errors import (
    DatasetClosedError,
    DatasetNotLicensedError,
    InvalidTokenError,
    LicenceInactiveError,
    MethodNotAllowedError,
    PurposeNotAllowedError,
    ServiceUnavailableError,
    UnknownDatasetError,
    UnknownOperationError,
)
from licensing.models import AppRow, CatalogueVersionRow, DatasetRow, LicenceRow
from storage.tasks import cancel_and_wait, within

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DatasetView:
    id: str
    name: str
    provider: str
    upstream: URL
    classification: int
    open_class: str
    free_monthly_calls: int
    per_call_e4: int
    per_record_e4: int
    #: Graduated monthly prices: ``(up_to or None, per_call_e4)``, ascending.
    tiers: tuple[tuple[int | None, int], ...]
    burst_per_second: float
    burst_capacity: int
    timeout_seconds: float | None
    #: The methods served (upper case).
    methods: frozenset[str] = frozenset({"GET", "HEAD"})
    #: Path patterns served, as segment tuples (empty: every path).
    paths: tuple[tuple[str, ...], ...] = ()
    #: Some pattern marks a segment as personal (``{personal}``).
    personal: bool = False
    #: The largest response relayed (``None``: the settings' default).
    max_response_bytes: int | None = None
    #: The longest silence of the upstream (``None``: the settings' default).
    idle_timeout_seconds: float | None = None
    #: The most records one call may return (``None``: unbounded; records not priced).
    max_records_per_call: int | None = None
    #: The version of the terms above (prices, tiers, split) in this view.
    terms_version: int = 1
    #: ``schemas.UpstreamPool`` as stored (``None``: ``upstream`` alone).
    upstream_pool: Mapping[str, Any] | None = None
    #: ``schemas.UpstreamTls`` as stored.
    upstream_tls: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class LicenceView:
    id: str
    licensee_id: str
    dataset_ids: frozenset[str]
    providers: frozenset[str]
    max_classification: int
    purposes: frozenset[str]
    valid_from: datetime
    valid_until: datetime
    status: str
    free_monthly_calls: int | None
    paid_credit_limit_fen: int | None
    paid_prepaid_calls: int | None
    #: Narrowing of every granted dataset's methods (``None``: theirs).
    methods: frozenset[str] | None = None
    #: Narrowing of datasets' paths, by dataset id, as segment tuples.
    paths: Mapping[str, tuple[tuple[str, ...], ...]] = field(default_factory=dict)

    def effective_status(self, now: datetime) -> str:
        """``active``, ``suspended``, ``revoked``, ``expired`` or ``not-yet-valid``."""
        if self.status != "active":
            return self.status
        if now < self.valid_from:
            return "not-yet-valid"
        if now >= self.valid_until:
            return "expired"
        return "active"

    def free_allowance(self, dataset: DatasetView) -> int:
        """Free public-interest calls a month: the licence's override, else the dataset's."""
        return dataset.free_monthly_calls if self.free_monthly_calls is None else self.free_monthly_calls

    def covers(self, dataset: DatasetView) -> bool:
        """The dataset is in scope by id or by ``provider/*``."""
        return dataset.id in self.dataset_ids or dataset.provider in self.providers


@dataclass(frozen=True, slots=True)
class AppView:
    id: str
    licensee_id: str
    name: str
    enabled: bool
    auth_method: str
    secret_hash: str | None
    jwks: Mapping[str, Any] | None
    #: The secret before the last rotation, and until when it is accepted.
    previous_secret_hash: str | None = None
    previous_secret_until: datetime | None = None


@dataclass(frozen=True, slots=True)
class Grant:
    """What the rules allowed for one call."""

    app: AppView
    licence: LicenceView
    dataset: DatasetView
    purpose: str


@dataclass(frozen=True)
class Catalogue:
    version: int = -1
    datasets: Mapping[str, DatasetView] = field(default_factory=dict)
    licences: Mapping[str, LicenceView] = field(default_factory=dict)
    apps: Mapping[str, AppView] = field(default_factory=dict)

    def authorize(
        self,
        *,
        app_id: str,
        licensee_id: str,
        licence_id: str,
        token_datasets: frozenset[str],
        purpose: str,
        dataset_id: str,
        now: datetime,
    ) -> Grant:
        """Apply the licence rules to one data call, in a fixed order; the first
        rule that fails names the problem."""
        app = self.apps.get(app_id)
        if app is None or not app.enabled:
            raise InvalidTokenError("the app of this token is unknown or disabled")
        if app.licensee_id != licensee_id:
            raise InvalidTokenError("the licensee of this token is not its app's")
        licence = self.licences.get(licence_id)
        if licence is None or licence.licensee_id != app.licensee_id:
            raise InvalidTokenError("the licence of this token does not belong to its app")
        state = licence.effective_status(now)
        if state != "active":
            raise LicenceInactiveError(f"licence {licence.id} is {state}")
        dataset = self.datasets.get(dataset_id)
        if dataset is None:
            raise UnknownDatasetError(f"no dataset {dataset_id!r} in the catalogue")
        if dataset.open_class == "closed":
            raise DatasetClosedError(f"dataset {dataset.id} is on the negative list and is never served")
        if not token_covers(token_datasets, dataset):
            raise DatasetNotLicensedError(f"this token was not issued for dataset {dataset.id}")
        if not licence.covers(dataset):
            raise DatasetNotLicensedError(f"licence {licence.id} does not grant dataset {dataset.id}")
        if dataset.classification > licence.max_classification:
            raise DatasetNotLicensedError(
                f"dataset {dataset.id} is classification {dataset.classification}; "
                f"licence {licence.id} allows up to {licence.max_classification}"
            )
        if purpose not in licence.purposes:
            raise PurposeNotAllowedError(f"licence {licence.id} does not grant purpose {purpose}")
        return Grant(app=app, licence=licence, dataset=dataset, purpose=purpose)


#: The order of methods in ``Allow``.
METHOD_ORDER = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def check_operation(grant: Grant, method: str, path: str) -> None:
    """The operation rules, applied after the licence rules: may this call's
    ``method`` reach ``path`` (relative to the dataset's upstream base, still
    percent-encoded, checked by the data plane, without its query)?

    - The path must match one of the dataset's patterns, if it declares any,
      and one of the licence's patterns for the dataset, if the licence names
      it: else 404 ``unknown-operation``. Paths come first: a path that is not
      served has no methods.
    - The method must be one the dataset serves and, if the licence narrows
      methods, one it allows: else 405 ``method-not-allowed`` with ``Allow``
      listing what is (empty when the two leave nothing). Methods are taken
      literally: ``GET`` does not imply ``HEAD``, nor anything ``OPTIONS``.

    Segments compare after percent-decoding (``%7E`` is ``~``), exactly and
    case-sensitively; ``*`` is one non-empty segment, a last ``**`` any rest,
    also none. ``stations/`` (a trailing empty segment) is not ``stations``.
    """
    dataset, licence = grant.dataset, grant.licence
    granted = licence.paths.get(dataset.id)
    if dataset.paths or granted is not None:
        segments = tuple(unquote(s) for s in path.split("/")) if path else ()
    if dataset.paths and not any(path_matches(p, segments) for p in dataset.paths):
        raise UnknownOperationError(f"dataset {dataset.id} serves no operation at /{path[:200]}")
    if granted is not None and not any(path_matches(p, segments) for p in granted):
        raise UnknownOperationError(
            f"licence {licence.id} grants no operation of dataset {dataset.id} at /{path[:200]}"
        )
    allowed = dataset.methods if licence.methods is None else dataset.methods & licence.methods
    if method not in allowed:
        raise MethodNotAllowedError(
            f"dataset {dataset.id} is not served with {method[:16]} under licence {licence.id}",
            allowed=tuple(m for m in METHOD_ORDER if m in allowed),
        )


#: A pattern segment matching one non-empty segment, like ``*``, that holds
#: personal data: the record keeps a keyed digest of it (``licensing.personal``).
PERSONAL = "{personal}"


def path_matches(pattern: tuple[str, ...], segments: tuple[str, ...]) -> bool:
    """``segments`` (decoded) fall under ``pattern`` (as declared)."""
    if pattern and pattern[-1] == "**":
        pattern = pattern[:-1]
        if len(segments) < len(pattern):
            return False
        segments = segments[: len(pattern)]
    elif len(segments) != len(pattern):
        return False
    return all(
        bool(segment) if wanted in ("*", PERSONAL) else unquote(wanted) == segment
        for wanted, segment in zip(pattern, segments, strict=True)
    )


def token_covers(token_datasets: frozenset[str], dataset: DatasetView) -> bool:
    return dataset.id in token_datasets or f"{dataset.provider}/*" in token_datasets


def _dataset_view(row: DatasetRow) -> DatasetView:
    return DatasetView(
        id=row.id,
        name=row.name,
        provider=row.provider,
        upstream=URL(row.upstream_url),
        classification=row.classification,
        open_class=row.open_class,
        free_monthly_calls=row.free_monthly_calls,
        per_call_e4=row.per_call_e4,
        per_record_e4=row.per_record_e4,
        tiers=tuple((t["up_to"], int(t["per_call_e4"])) for t in row.tiers),
        burst_per_second=row.burst_per_second,
        burst_capacity=row.burst_capacity,
        timeout_seconds=row.timeout_seconds,
        idle_timeout_seconds=row.idle_timeout_seconds,
        methods=frozenset(row.methods),
        paths=tuple(tuple(p.split("/")) for p in row.paths),
        personal=any(PERSONAL in p.split("/") for p in row.paths),
        max_response_bytes=row.max_response_bytes,
        max_records_per_call=row.max_records_per_call,
        terms_version=row.terms_version,
        upstream_pool=row.upstream_pool,
        upstream_tls=row.upstream_tls,
    )


def _licence_view(row: LicenceRow) -> LicenceView:
    return LicenceView(
        id=row.id,
        licensee_id=row.licensee_id,
        dataset_ids=frozenset(d for d in row.datasets if not d.endswith("/*")),
        providers=frozenset(d[:-2] for d in row.datasets if d.endswith("/*")),
        max_classification=row.max_classification,
        purposes=frozenset(row.purposes),
        valid_from=row.valid_from,
        valid_until=row.valid_until,
        status=row.status,
        free_monthly_calls=row.free_monthly_calls,
        paid_credit_limit_fen=row.paid_credit_limit_fen,
        paid_prepaid_calls=row.paid_prepaid_calls,
        methods=frozenset(row.methods) if row.methods is not None else None,
        paths=_granted_paths(row.paths or ()),
    )


def _granted_paths(patterns: Iterable[str]) -> dict[str, tuple[tuple[str, ...], ...]]:
    """``["{dataset}/{pattern}", ...]`` by dataset, each pattern as its segments."""
    by_dataset: dict[str, list[tuple[str, ...]]] = {}
    for pattern in patterns:
        dataset, _, rest = pattern.partition("/")
        by_dataset.setdefault(dataset, []).append(tuple(rest.split("/")))
    return {dataset: tuple(found) for dataset, found in by_dataset.items()}


def _app_view(row: AppRow) -> AppView:
    return AppView(
        id=row.id,
        licensee_id=row.licensee_id,
        name=row.name,
        enabled=row.enabled,
        auth_method=row.auth_method,
        secret_hash=row.secret_hash,
        jwks=row.jwks,
        previous_secret_hash=row.previous_secret_hash,
        previous_secret_until=row.previous_secret_until,
    )


async def current_version(session: AsyncSession) -> int:
    return int((await session.execute(select(CatalogueVersionRow.version))).scalar_one())


async def load_catalogue(sessions: async_sessionmaker[AsyncSession]) -> Catalogue:
    async with sessions() as session, session.begin():
        version = await current_version(session)
        datasets = (await session.execute(select(DatasetRow))).scalars().all()
        licences = (await session.execute(select(LicenceRow))).scalars().all()
        apps = (await session.execute(select(AppRow))).scalars().all()
    return Catalogue(
        version=version,
        datasets={r.id: _dataset_view(r) for r in datasets},
        licences={r.id: _licence_view(r) for r in licences},
        apps={r.id: _app_view(r) for r in apps},
    )


class VersionMirror(Protocol):
    """Where replicas share the catalogue version they hold (Redis)."""

    async def publish(self, version: int) -> None: ...

    async def read(self) -> int | None: ...

    async def loaded_everywhere(self, version: int) -> bool: ...


def max_view_age(refresh_seconds: float) -> float:
    """The oldest confirmation of its view a replica still serves data calls
    on: DESIGN §7's two seconds, or two polls when they are slower."""
    return max(CatalogueCache.PROMISE_SECONDS, 2 * refresh_seconds)


class CatalogueCache:
    """Holds the current :class:`Catalogue` and keeps it fresh."""

    #: DESIGN §7: licence changes reach every replica within this many seconds.
    PROMISE_SECONDS = 2.0
    #: Reloads before refusing something unknown happen at most this often.
    UNKNOWN_RELOAD_SECONDS = 0.5

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        refresh_seconds: float = 1.0,
        mirror: VersionMirror | None = None,
        *,
        degraded_max_seconds: float = 300.0,
    ) -> None:
        self._sessions = sessions
        self._mirror = mirror
        self._refresh_seconds = refresh_seconds
        self._lock = asyncio.Lock()
        self.current = Catalogue()
        #: False after a failed poll (a run of failures is logged once).
        self.healthy = True
        #: ``time.monotonic()`` at which the view was last known to be current.
        self.confirmed_at = time.monotonic()
        #: Oldest confirmation a data call is still served on.
        self.max_age = max_view_age(refresh_seconds)
        #: ``time.monotonic()`` of the first failed poll of the database since
        #: it last answered (``None``: it answers).
        self.database_lost_at: float | None = None
        #: How long data calls go on from this view without the database.
        self.degraded_max_seconds = degraded_max_seconds
        #: The poll a stale view's callers wait on (:meth:`confirm`).
        self._confirming: asyncio.Future[None] | None = None
        #: The reload callers refused for something unknown wait on.
        self._unknown_reload: asyncio.Future[None] | None = None
        self._unknown_reloaded_at = -self.UNKNOWN_RELOAD_SECONDS
        #: The pending reload has begun reading (a caller now needs the next).
        self._unknown_started = False

    async def reload(self) -> Catalogue:
        async with self._lock:
            started = time.monotonic()
            self.current = await load_catalogue(self._sessions)
            self.confirmed_at = max(self.confirmed_at, started)
        await self._publish(self.current.version)
        return self.current

    async def _publish(self, version: int) -> None:
        if self._mirror is not None:
            with contextlib.suppress(Exception):
                await self._mirror.publish(version)

    async def _read_version(self) -> int:
        async with self._sessions() as session:
            return await current_version(session)

    async def _poll_once(self) -> None:
        started = time.monotonic()
        try:
            # A frozen database answers nothing: a poll waits at most a
            # quarter of the view's age limit, so a view confirmed through
            # the mirror never reaches it.
            version = await within(self._read_version(), self.max_age / 4)
        except Exception:
            if self.database_lost_at is None:
                self.database_lost_at = started
            # The database is out of reach: no change can be committed while
            # it is, so the view stays current as long as the mirror (Redis,
            # where every replica publishes the version it loads) holds no
            # newer version. A replica that still reaches the database and
            # loads a change publishes it, and this view is then stale.
            asked = time.monotonic()
            if self._mirror is not None and await self._mirror.read() == self.current.version:
                self.confirmed_at = max(self.confirmed_at, asked)
                self.healthy = True
                return
            raise
        if version != self.current.version:
            await self.reload()
        else:
            await self._publish(version)
        self.database_lost_at = None
        self.confirmed_at = max(self.confirmed_at, started)

    def degraded_for(self) -> float | None:
        """Seconds the database has been out of reach (``None``: it answers)."""
        lost = self.database_lost_at
        return None if lost is None else time.monotonic() - lost

    async def barrier(self, version: int) -> None:
        """Return once every replica serves by catalogue ``version`` (at
        least) or refuses data calls: a change of terms applies from the
        next call on, on every replica (DESIGN §4).

        That is when every live replica reports it has loaded the version
        (they poll every ``catalogue_refresh_seconds``), and at the latest
        after ``max_age``: a replica that has not loaded it by then last
        confirmed its view before the change was committed (a confirmation
        after it reads the new version, from the database or from the
        mirror), so its view is too old to serve on (:meth:`fresh`)."""
        deadline = time.monotonic() + self.max_age
        # The mirror must hold the version: a replica cut off from the
        # database then no longer confirms its older view.
        await self._publish(max(version, self.current.version))
        while time.monotonic() < deadline:
            if self._mirror is not None:
                with contextlib.suppress(Exception):
                    if await self._mirror.loaded_everywhere(version):
                        return
            await asyncio.sleep(0.05)

    async def reload_for_unknown(self) -> bool:
        """Before a call is refused for something the view lacks (an app,
        licence or dataset made a moment ago through another replica or
        worker): reload it if the stored view moved on; whether the view
        changed. Reloads start at most once per ``UNKNOWN_RELOAD_SECONDS``:
        a caller joins the next one that has not begun reading yet, waiting
        for its turn (so a flood of unknown ids costs the database two
        version reads a second, and a caller never waits much longer than
        that turn)."""
        before = self.current.version
        pending = self._unknown_reload
        if pending is None or pending.done() or self._unknown_started:
            previous = pending if pending is not None and not pending.done() else None
            start_at = max(time.monotonic(), self._unknown_reloaded_at + self.UNKNOWN_RELOAD_SECONDS)
            self._unknown_reloaded_at = start_at
            self._unknown_started = False
            pending = self._unknown_reload = asyncio.ensure_future(self._reload_at(start_at, previous))
        with contextlib.suppress(Exception):
            await asyncio.shield(pending)
        return self.current.version != before

    async def _reload_at(self, start_at: float, previous: asyncio.Future[None] | None) -> None:
        if previous is not None:
            with contextlib.suppress(Exception):
                await previous
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        self._unknown_started = True
        await self._reload_if_changed()

    async def _reload_if_changed(self) -> None:
        version = await within(self._read_version(), self.max_age / 4)
        if version != self.current.version:
            await self.reload()

    @property
    def stale(self) -> bool:
        """The view's last confirmation is too old to serve on (:meth:`fresh`
        would refuse): :meth:`confirm` first."""
        return time.monotonic() - self.confirmed_at > self.max_age

    async def confirm(self) -> Catalogue:
        """:meth:`fresh`, after one poll of this caller's own when the view is
        stale (one poll, bounded like the background one, shared by every
        caller that finds it stale meanwhile). A process that fell behind its
        background poll (a starved machine) serves again as soon as the
        database confirms its view; one that cannot confirm it refuses."""
        if self.stale:
            if self._confirming is None or self._confirming.done():
                self._confirming = asyncio.ensure_future(self._poll_once())
            with contextlib.suppress(Exception):
                await asyncio.shield(self._confirming)
        return self.fresh()

    def fresh(self) -> Catalogue:
        """The current view, if it was confirmed recently enough to apply the
        licence rules on; ``service-unavailable`` (503) otherwise."""
        now = time.monotonic()
        age = now - self.confirmed_at
        if age > self.max_age:
            raise ServiceUnavailableError(
                f"the licence and catalogue view could not be refreshed for {age:.1f} s; "
                "data calls are refused until it can",
                headers={"Retry-After": "1"},
            )
        lost = self.database_lost_at
        if lost is not None and now - lost > self.degraded_max_seconds:
            raise ServiceUnavailableError(
                f"the database has been out of reach for {now - lost:.0f} s, longer than data calls "
                f"go on without it ({self.degraded_max_seconds:g} s); they are refused until it is back",
                headers={"Retry-After": "5"},
            )
        return self.current

    async def watch(self) -> None:
        """Poll the database's catalogue version until cancelled."""
        while True:
            await asyncio.sleep(self._refresh_seconds)
            try:
                await self._poll_once()
                self.healthy = True
            except Exception:
                if self.healthy:
                    log.warning("catalogue refresh failed; serving the last loaded view", exc_info=True)
                self.healthy = False

    @contextlib.asynccontextmanager
    async def running(self) -> Any:
        await self.reload()
        task = asyncio.create_task(self.watch(), name="catalogue-watch")
        try:
            yield self
        finally:
            await cancel_and_wait(task)
