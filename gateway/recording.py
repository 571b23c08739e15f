"""The call record of one data call, made durable before the call's response
completes (DESIGN §5, §7).

A call is recorded once it passed authentication, whatever happens next.
The record goes to the log (``ledger.log``) in the batch pipeline shared by
all calls in flight; the data plane awaits the ``XADD`` acknowledgement
before it sends the last bytes of the response, so no client ever holds a
complete response whose record is not durable:

- a refusal or failure the gateway answers itself is recorded, then sent;
- a relayed response is streamed, one chunk behind: the last chunk (for a
  small response, all of it, headers included) leaves only after the record
  is acknowledged. If the record cannot be written the connection is cut (or,
  before any byte left, the caller gets 503 ``ledger-unavailable``) and the
  call is handed to the ledger writer, which records it ``incomplete`` and
  releases it unless its record did land.

Records hold ids and digests only: never a token, a secret, a request body,
or the query string (it may carry personal data; its digest is kept).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from cryptography.hazmat.primitives import hashes

from gateway.state import CLOCK, PRESENCE, QUOTA, SETTINGS
from ledger.log import LOG
from ledger.record import SERVED, clip, opening, to_log
from licensing.errors import LedgerUnavailableError
from licensing.tokens import AccessClaims
from metering.periods import period_of, zone
from metering.quota import QuotaStoreError

if TYPE_CHECKING:
    from gateway.charging import Charge

#: An ``X-Request-Id`` passed on (and recorded) as the caller sent it; any
#: other is replaced by the call id.
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")


def request_id(request: web.Request, call_id: str) -> str:
    incoming = request.headers.get("X-Request-Id", "")
    return incoming if REQUEST_ID.match(incoming) else call_id


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


class CallRecorder:
    """The record of one authenticated data call, filled in as it goes."""

    __slots__ = ("_perf", "app", "epoch", "new_digest", "now", "period", "record", "written")

    def __init__(self, request: web.Request, claims: AccessClaims, call_id: str) -> None:
        app = request.app
        self.app = app
        self._perf = time.perf_counter()
        #: Raises 503 ledger-unavailable when records cannot be taken now.
        self.epoch = app[PRESENCE].check()
        settings = app[SETTINGS]
        #: When the call began, and its billing period: the reservation is
        #: judged at the same instant.
        self.now = now = app[CLOCK].now()
        self.period = period_of(now, zone(settings.billing.time_zone))
        self.new_digest = digest_factory(settings.ledger.hash_algorithm)
        target, sep, query = request.raw_path.partition("?")
        dataset = target.split("/", 3)[2] if target.count("/") >= 2 else ""
        self.written = False
        self.record: dict[str, Any] = {
            "call_id": call_id,
            "request_id": request_id(request, call_id),
            "started_at": now,
            "app_id": claims.app_id,
            "licensee_id": claims.licensee_id,
            "licence_id": claims.licence_id,
            "dataset_id": clip(dataset, "dataset_id"),
            "purpose": claims.purpose,
            "method": clip(request.method, "method"),
            "path": clip(target, "path"),
            "query_digest": self._digest_hex(query.encode()) if sep else None,
            "pool": None,
            "period": self.period.name,
            "client_address": clip(request.remote or "", "client_address"),
            "token_id": claims.token_id[:64],
            # Set when the call is reserved: the terms it is charged under.
            "terms_version": None,
        }

    def _digest_hex(self, data: bytes) -> str:
        digest = self.new_digest()
        digest.update(data)
        return str(digest.hexdigest())

    def digest_of(self, body: bytes) -> str | None:
        return self._digest_hex(body) if body else None

    def skeleton(self) -> bytes:
        """The record so far (kept with the reservation while in flight)."""
        return opening(self.record)

    def still_valid(self) -> bool:
        return bool(self.app[PRESENCE].still_valid(self.epoch))

    async def write(
        self,
        *,
        status: int,
        outcome: str,
        problem: str | None = None,
        upstream_status: int | None = None,
        records: int = 0,
        size: int = 0,
        digest: str | None = None,
        charge: Charge | None = None,
    ) -> None:
        """Append the finished record to the log and wait for it to be there;
        with the call's ``charge``, settle it (``served``) or release it (any
        other outcome) in the same step.

        Raises :class:`LedgerUnavailableError` if it could not be (the call is
        then the ledger writer's to end).
        """
        if self.written:
            return
        record = self.record
        record.update(
            time=self.app[CLOCK].now(),
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
        if not self.still_valid():
            if charge is not None:
                charge.orphan(self.app)
            raise LedgerUnavailableError("the call record log was out of reach during this call")
        try:
            if charge is None:
                await self.app[QUOTA].append(LOG, to_log(record))
            else:
                # A paid call's charge is decided as it is settled, and
                # written into its record then.
                served = outcome == SERVED
                await charge.record_and_finish(self.app, LOG, record, served=served, records=records)
        except QuotaStoreError as exc:
            raise LedgerUnavailableError(
                "the call record cannot be made durable", headers={"Retry-After": "1"}
            ) from exc
        self.written = True
