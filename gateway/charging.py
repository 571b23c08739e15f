"""The quota rules of a data call: its terms, what the quota store's answer
to its reservation means (:func:`judge`), the Idempotency-Key and the
``RateLimit`` fields. ``gateway.call`` reserves before forwarding and settles
or releases after; ``metering.quota`` does the counting.

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
from datetime import datetime

import orjson
from aiohttp import web

from core.errors import (
    BadRequestError,
    ConflictError,
    IdempotencyMismatchError,
    PaymentRequiredError,
    QuotaExhaustedError,
    RateLimitedError,
)
from licensing.catalogue import Grant
from metering.periods import Period
from metering.quota import (
    EXHAUSTED,
    IDEMPOTENCY_MISMATCH,
    IN_FLIGHT,
    NOT_KEPT,
    RATE_LIMITED,
    REPLAYED,
    Outcome,
    Reservation,
    Terms,
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


@dataclass(slots=True)
class Charge:
    """One call's reservation as the quota store answered it, and the
    headers it reports. Finished by ``gateway.call.Call``."""

    reservation: Reservation | None
    outcome: Outcome
    headers: dict[str, str]
    per_record_e4: int
    pool: str
    #: Settled, released or handed to the ledger writer: nothing is held.
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


def terms_of(grant: Grant, app_id: str) -> Terms:
    """What a call of ``app_id`` under ``grant`` draws on."""
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


def judge(grant: Grant, reservation: Reservation, outcome: Outcome, period: Period, now: datetime) -> Charge:
    """What the quota store's answer to ``reservation`` means for the call:
    its :class:`Charge`, or the problem that refuses it (429, 402, 422, 409).
    Judged at the instant and in the period of the call's start (``now``)."""
    app_id = grant.app.id
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
        # Answered from the kept response, drawn on no pool (the pool counted
        # the call it repeats): nothing is held.
        held = None
        replay = KeptResponse.decode(outcome.response or b"")
    return Charge(held, outcome, headers, grant.dataset.per_record_e4, reservation.pool.kind, replay=replay)
