"""The quota stage of the data plane: reserve before forwarding, settle or
release after (``metering.quota`` does the counting).

- ``public-interest`` calls draw on the free allowance; exhausted: 429
  ``quota-exhausted`` with ``Retry-After`` = seconds to the next period.
- ``industrial`` calls draw on the licence's paid terms; exhausted, or none:
  402 ``payment-required``.
- The burst limit per app and dataset: 429 ``rate-limited`` with ``Retry-After``.
- ``Idempotency-Key`` (draft-ietf-httpapi-idempotency-key-header): the key,
  per app, is bound for 24 h to the request first sent with it, by a
  fingerprint of its method, path, query and body digest (the body is read,
  within ``proxy.max_body_bytes``, before anything is reserved; only its
  digest is kept). The same key with another request: 422
  ``idempotency-mismatch``, never forwarded. A retry of the same request
  while the first is in flight: 409 ``conflict``. Once the first was served,
  a retry never reaches the upstream again nor is charged: the gateway
  answers it with the first response (status, headers, body), kept in the
  quota store with the key when its body is at most
  ``proxy.idempotent_response_max_bytes``; the retry has its own
  ``X-Call-Id`` and ``RateLimit`` fields, is recorded with pool ``replay``
  and counts against the burst limit. A response too large to keep (or a
  call the ledger writer ended for a gateway that stopped): the retry gets
  409 ``conflict`` naming the first call (``first_call_id``). A
  first call that was not served (an upstream failure, a response cut short)
  frees the key: a retry is a new call.
- The quota store unreachable: 503 ``quota-unavailable``, nothing forwarded.

A served call (any status below 500 whose body was sent whole) stays charged;
an upstream failure (5xx, timeout, connection error) or a response cut short
is released: never charged.

A paid call is priced when it is settled (``metering/lua/finish.lua``): it
takes the next position of the dataset's graduated tiers for the period, so
the n-th charged call is priced at position n whatever fails or is released
in between; its records' price is added then. A credit pool reserves each
call's worst case first (the dearest tier it can still land in, plus
``max_records_per_call`` records) and settlement keeps only the actual
charge, so a credit limit is never exceeded: a call whose worst case does not
fit gets 402 before anything is forwarded. (A dataset that prices records
without ``max_records_per_call``, possible only for one made before that
field existed, gets 402 on credit pools until it is set.)

Responses carry the IETF ``RateLimit-Policy`` and ``RateLimit`` fields
(draft-ietf-httpapi-ratelimit-headers-10) for the pool that applied, named
``"free"`` or ``"paid"``, and for ``"burst"``. A credit pool is counted in fen
(``qu="fen"``); a prepaid balance has no window.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from gateway.recording import CallRecorder
from gateway.state import PRESENCE, QUOTA, REPLICA_ID
from ledger.record import REPLAY_POOL, to_log, to_log_uncharged
from licensing.catalogue import Grant
from licensing.errors import (
    BadRequestError,
    ConflictError,
    IdempotencyMismatchError,
    PaymentRequiredError,
    QuotaExhaustedError,
    QuotaUnavailableError,
    RateLimitedError,
)
from metering.periods import Period
from metering.quota import (
    EXHAUSTED,
    IDEMPOTENCY_MISMATCH,
    IN_FLIGHT,
    NOT_KEPT,
    RATE_LIMITED,
    REPLAYED,
    Outcome,
    QuotaStoreError,
    Reservation,
    Terms,
    plan_reservation,
    pool_kind,
)

_IDEMPOTENCY_KEY_MAX = 255
#: Fields the gateway sets on each call, not kept with a replayed response.
_PER_CALL_HEADERS = frozenset({"x-call-id", "ratelimit", "ratelimit-policy"})


@dataclass(frozen=True, slots=True)
class KeptResponse:
    """A served response as kept for the retries of its Idempotency-Key:
    what the caller got from the upstream, but the fields of the call itself."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    #: The ``Content-Length`` it was sent with, if any (a ``HEAD`` has none
    #: of the body it announces).
    length: int | None
    records: int
    body: bytes

    def encode(self) -> bytes:
        """One JSON line of everything but the body, then the body."""
        head = {
            "status": self.status,
            "reason": self.reason,
            "headers": self.headers,
            "length": self.length,
            "records": self.records,
        }
        return orjson.dumps(head) + b"\n" + self.body

    @classmethod
    def decode(cls, data: bytes) -> KeptResponse:
        head, _, body = data.partition(b"\n")
        fields = orjson.loads(head)
        return cls(
            status=int(fields["status"]),
            reason=str(fields["reason"]),
            headers=[(str(name), str(value)) for name, value in fields["headers"]],
            length=None if fields["length"] is None else int(fields["length"]),
            records=int(fields["records"]),
            body=body,
        )


def kept_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The response fields kept for a replay: all but the call's own."""
    return [(name, value) for name, value in headers if name.lower() not in _PER_CALL_HEADERS]


def fingerprint(method: str, raw_path: str, body: bytes) -> str:
    """What binds an Idempotency-Key to its request: its method, path and
    query (the raw target, as sent) and the SHA-256 of its body."""
    body_digest = hashlib.sha256(body).hexdigest()
    return hashlib.sha256(f"{method}\n{raw_path}\n{body_digest}".encode()).hexdigest()


@dataclass
class Charge:
    """One call's reservation and the headers it reports."""

    reservation: Reservation | None
    outcome: Outcome
    period: Period
    headers: dict[str, str]
    per_record_e4: int
    pool: str
    done: bool = False
    #: A retry of an idempotent call already served: the response kept for
    #: it, which answers the call (nothing is forwarded).
    replay: KeptResponse | None = None
    #: The served response to keep for the retries of this call's
    #: Idempotency-Key (``keep``).
    kept: bytes = b""

    @property
    def keeps_response(self) -> bool:
        """The call holds an Idempotency-Key: its served response is kept."""
        return self.reservation is not None and self.reservation.idempotent

    def keep(self, response: KeptResponse) -> None:
        self.kept = response.encode()

    @property
    def priced(self) -> bool:
        """Served, the call is charged: a paid pool, and not a replay of an
        idempotent call already charged (nor the free allowance)."""
        return self.reservation is not None and self.pool in ("prepaid", "credit")

    async def record_and_finish(
        self, app: web.Application, log: str, record: dict[str, Any], *, served: bool, records: int
    ) -> None:
        """Append the call's ``record`` (to the stream ``log``) and settle the
        call (``served``: it stays charged; a paid call is priced now, its
        charge written into the record as it is appended) or release it: one
        round trip on a single server (``QuotaBatcher.finish``). With nothing
        to finish, only the append.

        Raises :class:`QuotaStoreError` if that failed. Then, and if this is
        cancelled while it waits, whether the record landed is not known here:
        the call is handed to the ledger writer, which settles or releases it
        by what the ledger holds (the hand-over of a call finished meanwhile
        finds nothing to do)."""
        reservation = self.reservation
        if reservation is None or self.done:
            await app[QUOTA].append(log, to_log(record))
            return
        self.done = True
        charge_at, extra = 0, 0
        if served and self.priced:
            entry, charge_at = to_log_uncharged(record)
            extra = records * self.per_record_e4
        else:
            entry = to_log(record)
        try:
            action = "settle" if served else "release"
            kept = self.kept if served else b""
            await app[QUOTA].finish(
                reservation, action, extra, record=(log, entry), charge_at=charge_at, response=kept
            )
        except BaseException:
            app[PRESENCE].orphan(reservation.licence_id, reservation.call_id)
            raise

    def orphan(self, app: web.Application) -> None:
        """The call's record could not be written: leave the call to the
        ledger writer, which records it and settles or releases it."""
        if self.reservation is None or self.done:
            return
        self.done = True
        app[PRESENCE].orphan(self.reservation.licence_id, self.reservation.call_id)


def _terms(grant: Grant, app_id: str) -> Terms:
    licence, dataset = grant.licence, grant.dataset
    return Terms(
        licence_id=licence.id,
        app_id=app_id,
        dataset_id=dataset.id,
        purpose=grant.purpose,
        free_limit=licence.free_allowance(dataset),
        prepaid_calls=licence.paid_prepaid_calls,
        credit_limit_fen=licence.paid_credit_limit_fen,
        per_call_e4=dataset.per_call_e4,
        tiers=dataset.tiers,
        burst_per_second=dataset.burst_per_second,
        burst_capacity=dataset.burst_capacity,
        worst_records_e4=dataset.per_record_e4 * (dataset.max_records_per_call or 0),
    )


def _headers(reservation: Reservation, outcome: Outcome) -> dict[str, str]:
    pool = reservation.pool
    policies, states = [], []
    if pool.kind != "none":
        unit = ';qu="fen"' if pool.kind == "credit" else ""
        scale = 10000 if pool.kind == "credit" else 1
        quota = pool.limit // scale
        remaining = max(0, pool.limit - outcome.used) // scale
        window = f";w={pool.window_seconds}" if pool.window_seconds else ""
        reset = f";t={pool.reset_seconds}" if pool.reset_seconds else ""
        policies.append(f'"{pool.name}";q={quota}{window}{unit}')
        states.append(f'"{pool.name}";r={remaining}{reset}')
    burst_window = max(1, math.ceil(reservation.burst_window))
    policies.append(f'"burst";q={reservation.burst_capacity};w={burst_window}')
    return (
        {"RateLimit-Policy": ", ".join(policies), "RateLimit": ", ".join(states)}
        if states
        else {"RateLimit-Policy": ", ".join(policies)}
    )


def idempotency_key(request: web.Request) -> str | None:
    values = request.headers.getall("Idempotency-Key", [])
    if not values:
        return None
    key = values[0].strip().strip('"')
    if len(values) > 1 or not key or len(key) > _IDEMPOTENCY_KEY_MAX or not key.isprintable():
        raise BadRequestError(
            f"Idempotency-Key must be one printable value of at most {_IDEMPOTENCY_KEY_MAX} characters"
        )
    return key


async def reserve(
    request: web.Request,
    grant: Grant,
    app_id: str,
    call_id: str,
    recorder: CallRecorder,
    *,
    key: str | None = None,
    request_fingerprint: str = "",
) -> Charge:
    """Reserve this call's quota, or raise the problem that refuses it. The
    call record so far (``recorder``) stays with the reservation while the
    call is in flight. ``key``: the call's Idempotency-Key, bound to
    ``request_fingerprint`` (:func:`fingerprint`)."""
    terms = _terms(grant, app_id)
    # Judged at the instant and in the period the call record says.
    now, period = recorder.now, recorder.period
    recorder.record["pool"] = kind = pool_kind(terms)
    dataset = grant.dataset
    # The prices below and the record name the same version of the terms.
    recorder.record["terms_version"] = dataset.terms_version
    if kind == "credit" and dataset.per_record_e4 and dataset.max_records_per_call is None:
        raise PaymentRequiredError(
            f"dataset {dataset.id} prices records but sets no max_records_per_call, "
            "so a call's worst case cannot be held against the credit limit"
        )
    record = recorder.skeleton()
    reservation = plan_reservation(
        terms,
        period,
        now,
        call_id,
        key,
        replica=request.app[REPLICA_ID],
        record=record,
        fingerprint=request_fingerprint,
    )
    try:
        outcome = await request.app[QUOTA].reserve(reservation)
    except QuotaStoreError as exc:
        raise QuotaUnavailableError(
            "the quota store cannot be reached; nothing was forwarded", headers={"Retry-After": "1"}
        ) from exc
    headers = _headers(reservation, outcome)
    if outcome.status == RATE_LIMITED:
        retry = str(max(1, math.ceil(outcome.retry_after_ms / 1000)))
        # The burst limit applied; the pool's balance was not read (the
        # script stops at the burst check), so it is not reported.
        raise RateLimitedError(
            f"app {app_id} exceeds the burst limit of dataset {grant.dataset.id}",
            headers={**headers, "RateLimit": f'"burst";r=0;t={retry}', "Retry-After": retry},
        )
    if outcome.status == EXHAUSTED:
        if reservation.pool.name == "free":
            raise QuotaExhaustedError(
                f"the free monthly allowance of licence {grant.licence.id} for dataset {grant.dataset.id} "
                f"is used up for {period.name}",
                headers={**headers, "Retry-After": str(period.seconds_left(now))},
            )
        what = "no paid terms" if reservation.pool.kind == "none" else "no paid balance or credit left"
        raise PaymentRequiredError(
            f"licence {grant.licence.id} has {what} for industrial use", headers=headers
        )
    first = outcome.first_call_id
    if outcome.status == IDEMPOTENCY_MISMATCH:
        raise IdempotencyMismatchError(
            f"this Idempotency-Key was first used by call {first} for another request "
            "(method, path, query or body); send a new key with a new request",
            first_call_id=first,
        )
    if outcome.status == IN_FLIGHT:
        raise ConflictError(
            f"the call {first} with this Idempotency-Key is still in flight",
            headers={"Retry-After": "1"},
            first_call_id=first,
        )
    if outcome.status == NOT_KEPT:
        raise ConflictError(
            f"the call {first} with this Idempotency-Key was served; its response was too large "
            "to keep, so it is not sent again",
            first_call_id=first,
        )
    held: Reservation | None = reservation
    replay = None
    if outcome.status == REPLAYED:
        # Answered from the kept response, drawn on no pool: the record says
        # so, and billing and reconciliation leave it out (the pool counted
        # the call it repeats).
        held = None
        recorder.record["pool"] = REPLAY_POOL
        replay = KeptResponse.decode(outcome.response or b"")
    return Charge(
        held, outcome, period, headers, grant.dataset.per_record_e4, reservation.pool.kind, replay=replay
    )
