"""One data call, from its authentication to its durable record: the one
owner of the call record and of the call's reservation (DESIGN §4, §5, §7).

A :class:`Call` is opened once the caller's token is verified; from then on
the call is recorded, whatever happens next. It has the verbs a call has:

- :meth:`Call.reserve` its quota before anything is forwarded (the
  reservation is judged by ``gateway.charging``, which raises the refusal);
- :meth:`Call.finish` it: the one place that completes the record and
  settles (served) or releases (anything else) the reservation, in the same
  round trip that appends the record to the log (``QuotaBatcher.finish``);
- :meth:`Call.abandon` it: a call whose record or finish could not be
  written is handed to the ledger writer, which records it (unless its
  record did land) and settles or releases it by that.

The data plane awaits :meth:`Call.finish` before it sends the last bytes of
a response, so no client ever holds a complete response whose record is not
durable: a refusal the gateway answers itself is recorded, then sent; a
relayed response streams one chunk behind, its last chunk held until the
record is acknowledged. If the record cannot be written the connection is
cut (or, before any byte left, the caller gets 503 ``ledger-unavailable``).

A call is built from explicit collaborators (:class:`CallContext`: the quota
batcher, the replica's presence, the clock, the billing time zone, the digest)
and plain request values, not from an HTTP request: it is tested without a
server. Records hold ids and digests only: never a token, a secret, a request
body, or the query string (its digest is kept).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from cryptography.hazmat.primitives import hashes

from core.errors import LedgerUnavailableError, PaymentRequiredError, QuotaUnavailableError
from gateway import charging
from gateway.charging import Charge
from ledger.log import LOG, Presence
from ledger.record import REPLAY_POOL, SERVED, clip, opening, to_log, to_log_uncharged
from licensing.catalogue import DatasetView, Grant
from licensing.personal import PersonalDigest
from licensing.tokens import AccessClaims
from metering.periods import Period, period_of
from metering.quota import QuotaBatcher, QuotaStoreError, Reservation, ReservationPlan, plan


class _SM3:
    """SM3 through ``cryptography`` (``hashlib`` may lack it)."""

    __slots__ = ("_hash",)

    def __init__(self) -> None:
        self._hash = hashes.Hash(hashes.SM3())

    def update(self, data: bytes, /) -> None:
        self._hash.update(data)

    def hexdigest(self) -> str:
        return self._hash.finalize().hex()


def digest_factory(algorithm: str) -> Callable[[], Any]:
    return hashlib.sha256 if algorithm == "sha256" else _SM3


class Clock(Protocol):
    def now(self) -> datetime: ...


#: Reservation plans kept at most (a new catalogue view, or a new period,
#: makes new ones; the old are dropped when the limit is reached).
MAX_PLANS = 4096


class _Memo:
    """What calls in a row share: the current period and its bounds, and the
    reservation plans of the current catalogue view, by licence, dataset, app
    and purpose (the views are the catalogue's own objects: a new view's are
    new objects, so its plans are made anew)."""

    __slots__ = ("end", "period", "plans", "start")

    def __init__(self) -> None:
        self.period: Period | None = None
        self.start = self.end = datetime.min.replace(tzinfo=UTC)
        self.plans: dict[tuple[int, int, str, str], tuple[Grant, ReservationPlan]] = {}


@dataclass(frozen=True, slots=True)
class CallContext:
    """What every call of this gateway works with, made once."""

    quota: QuotaBatcher
    presence: Presence
    clock: Clock
    #: The billing time zone: a call's period is the month of its start there.
    zone: ZoneInfo
    #: A new digest object (SHA-256 or SM3, the ledger's algorithm).
    new_digest: Callable[[], Any]
    #: This process among the replicas (the in-flight marker names it).
    replica_id: str
    #: Keyed digests of personal path segments (``None``: no key loaded).
    personal: PersonalDigest | None = None
    #: The call-record log.
    log: str = LOG
    memo: _Memo = field(default_factory=_Memo, compare=False)

    def period_at(self, now: datetime) -> Period:
        """The billing period holding ``now``."""
        memo = self.memo
        if memo.period is not None and memo.start <= now < memo.end:
            return memo.period
        period = period_of(now, self.zone)
        memo.period, memo.start, memo.end = period, period.start, period.end
        return period

    def plan(self, grant: Grant, app_id: str, period: Period) -> ReservationPlan:
        """The reservation plan of ``app_id``'s calls under ``grant`` in ``period``."""
        plans = self.memo.plans
        key = (id(grant.licence), id(grant.dataset), app_id, grant.purpose)
        kept = plans.get(key)
        if kept is not None:
            held, made = kept
            if held.licence is grant.licence and held.dataset is grant.dataset and made.period == period:
                return made
        made = plan(charging.terms_of(grant, app_id), period, replica=self.replica_id)
        if len(plans) >= MAX_PLANS:
            plans.clear()
        # The grant keeps its views alive, so their ids are not reused meanwhile.
        plans[key] = (grant, made)
        return made


class Call:
    """The record and the reservation of one authenticated data call."""

    __slots__ = ("_perf", "charge", "ctx", "epoch", "now", "period", "record", "upstream_seconds", "written")

    def __init__(
        self,
        ctx: CallContext,
        claims: AccessClaims,
        *,
        call_id: str,
        request_id: str,
        method: str,
        raw_path: str,
        client_address: str,
    ) -> None:
        self.ctx = ctx
        self._perf = time.perf_counter()
        #: Raises 503 ledger-unavailable when records cannot be taken now.
        self.epoch = ctx.presence.check()
        #: When the call began, and its billing period: the reservation is
        #: judged at the same instant.
        self.now = now = ctx.clock.now()
        self.period: Period = ctx.period_at(now)
        target, sep, query = raw_path.partition("?")
        dataset = target.split("/", 3)[2] if target.count("/") >= 2 else ""
        self.written = False
        #: How long the upstream took to answer (to its response's head,
        #: across attempts); ``None`` until it did. Not part of the record.
        self.upstream_seconds: float | None = None
        #: The reservation, once made (``None``: nothing is held).
        self.charge: Charge | None = None
        self.record: dict[str, Any] = {
            "call_id": call_id,
            "request_id": request_id,
            "started_at": now,
            "app_id": claims.app_id,
            "licensee_id": claims.licensee_id,
            "licence_id": claims.licence_id,
            "dataset_id": clip(dataset, "dataset_id"),
            "purpose": claims.purpose,
            "method": clip(method, "method"),
            "path": clip(target, "path"),
            "query_digest": self._digest_hex(query.encode()) if sep else None,
            "pool": None,
            "period": self.period.name,
            "client_address": clip(client_address, "client_address"),
            "token_id": claims.token_id[:64],
            # Set when the call is reserved: the terms it is charged under.
            "terms_version": None,
            # Set by the forwarder: the upstream target that answered (or was tried last).
            "upstream_target": None,
        }

    def mask_path(self, target: str, dataset: DatasetView, rest: str) -> None:
        """Record the path (``target``, as sent, without its query) with the
        dataset's personal segments as keyed digests (``licensing.personal``);
        ``rest`` is its part below the dataset."""
        personal = self.ctx.personal
        if personal is None:
            return
        head = target[: len(target) - len(rest)]
        self.record["path"] = clip(head + personal.masked(dataset.paths, rest), "path")

    @property
    def call_id(self) -> str:
        return str(self.record["call_id"])

    def _digest_hex(self, data: bytes) -> str:
        digest = self.ctx.new_digest()
        digest.update(data)
        return str(digest.hexdigest())

    def new_digest(self) -> Any:
        return self.ctx.new_digest()

    def digest_of(self, body: bytes) -> str | None:
        return self._digest_hex(body) if body else None

    def authorised(self, grant: Grant) -> None:
        """The licence rules passed: the record names the dataset as the catalogue does."""
        self.record["dataset_id"] = grant.dataset.id

    async def reserve(self, grant: Grant, *, key: str | None = None, fingerprint: str = "") -> Charge:
        """Reserve this call's quota, or raise the problem that refuses it.
        The record so far stays with the reservation while the call is in
        flight. ``key``: the call's Idempotency-Key, bound to ``fingerprint``
        (:func:`gateway.charging.fingerprint`)."""
        record = self.record
        made = self.ctx.plan(grant, record["app_id"], self.period)
        dataset = grant.dataset
        record["pool"] = kind = made.kind
        # The prices below and the record name the same version of the terms.
        record["terms_version"] = dataset.terms_version
        if kind == "credit" and dataset.per_record_e4 and dataset.max_records_per_call is None:
            raise PaymentRequiredError(
                f"dataset {dataset.id} prices records but sets no max_records_per_call, "
                "so a call's worst case cannot be held against the credit limit"
            )
        reservation = made.reservation(
            self.now, record["call_id"], key, record=opening(record), fingerprint=fingerprint
        )
        try:
            outcome = await self.ctx.quota.reserve(reservation)
        except QuotaStoreError as exc:
            # The store may yet have made it (its answer lost, or late): the
            # ledger writer releases whatever is held for this call id.
            self.ctx.presence.orphan(reservation.licence_id, reservation.call_id)
            raise QuotaUnavailableError(
                "the quota store cannot be reached; nothing was forwarded", headers={"Retry-After": "1"}
            ) from exc
        charge = charging.judge(grant, reservation, outcome, self.period, self.now)
        if charge.replay is not None:
            # Answered from the kept response, drawn on no pool: the record
            # says so, and billing and reconciliation leave it out.
            self.record["pool"] = REPLAY_POOL
        self.charge = charge
        return charge

    async def finish(
        self,
        *,
        status: int,
        outcome: str,
        problem: str | None = None,
        upstream_status: int | None = None,
        records: int = 0,
        size: int = 0,
        digest: str | None = None,
    ) -> None:
        """Complete the record, append it to the log and wait for it to be
        there; with a reservation, settle it (``served``: it stays charged, a
        paid call priced now at its tier position, its charge written into
        the record as it is appended) or release it (any other outcome), in
        the same round trip.

        Raises :class:`LedgerUnavailableError` if it could not be: the call
        is then the ledger writer's to end (:meth:`abandon`)."""
        if self.written:
            return
        record = self.record
        record.update(
            time=self.ctx.clock.now(),
            status=status,
            upstream_status=upstream_status,
            outcome=outcome,
            problem=problem,
            records=records,
            bytes=size,
            latency_us=int((time.perf_counter() - self._perf) * 1_000_000),
            charge_e4=0,
            response_digest=digest,
        )
        if not self.ctx.presence.still_valid(self.epoch):
            self.abandon()
            raise LedgerUnavailableError("the call record log was out of reach during this call")
        try:
            await self._append_and_finish(record, served=outcome == SERVED, records=records)
        except QuotaStoreError as exc:
            raise LedgerUnavailableError(
                "the call record cannot be made durable", headers={"Retry-After": "1"}
            ) from exc
        self.written = True

    async def _append_and_finish(self, record: dict[str, Any], *, served: bool, records: int) -> None:
        """One round trip on a single server (``QuotaBatcher.finish``); with
        nothing to finish, only the append. If that fails, or is cancelled
        while it waits, whether the record landed is not known here: the call
        is handed to the ledger writer (the hand-over of a call finished
        meanwhile finds nothing to do)."""
        charge = self.charge
        reservation = self._let_go()
        if charge is None or reservation is None:
            await self.ctx.quota.append(self.ctx.log, to_log(record))
            return
        charge_at, extra = 0, 0
        if served and charge.priced:
            entry, charge_at = to_log_uncharged(record)
            extra = records * charge.per_record_e4
        else:
            entry = to_log(record)
        try:
            await self.ctx.quota.finish(
                reservation,
                "settle" if served else "release",
                extra,
                record=(self.ctx.log, entry),
                charge_at=charge_at,
                response=charge.kept if served else b"",
            )
        except QuotaStoreError:
            # The answer was lost, not necessarily the run (a server stopped
            # after running it, before replying): ask, once its deadline has
            # passed. If it ran, the record is durable and the call finished
            # as this replica decided: the caller gets what the record says.
            landed, server_us = await self.ctx.quota.finished(reservation)
            if landed and self.ctx.presence.never_presumed_dead(self.epoch, server_us):
                return
            self.ctx.presence.orphan(reservation.licence_id, reservation.call_id)
            raise
        except BaseException:
            self.ctx.presence.orphan(reservation.licence_id, reservation.call_id)
            raise

    def abandon(self) -> None:
        """The call's record or finish could not be written: leave the call
        to the ledger writer, which records it and settles or releases it."""
        reservation = self._let_go()
        if reservation is not None:
            self.ctx.presence.orphan(reservation.licence_id, reservation.call_id)

    def _let_go(self) -> Reservation | None:
        """The reservation this call still holds, if any, which it holds no
        longer: a call is finished or abandoned once."""
        charge = self.charge
        if charge is None or charge.reservation is None or charge.done:
            return None
        charge.done = True
        return charge.reservation
