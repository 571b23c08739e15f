"""The in-flight entry of a reserved call: its one definition.

A licence's calls in flight are a Redis hash, :func:`key` (the licence's hash
tag: the same Cluster slot as its quota keys). ``metering/lua/reserve.lua``
enters a call in the run that counts it; ``metering/lua/finish.lua`` removes
it in the run that settles or releases it; the ledger writer ends the calls of
replicas that died (``ledger.writer``). Each field is a call id; its value:

    cost|replica|kind|idem|pool key|paid key|idempotency key|record

- ``cost``: what the reservation took (calls, or 1/10000 fen on a credit
  pool), written by ``reserve.lua`` before the rest, which the gateway makes
  (:func:`marker`);
- ``replica``: the replica serving the call, or ``orphan`` once it handed the
  call to the ledger writer (:data:`ORPHAN_SCRIPT`);
- ``kind``: the pool (free | prepaid | credit | none); ``idem``: ``1`` when the
  call has an Idempotency-Key;
- the three keys a finish needs; ids and keys never hold a ``|``;
- ``record``: the opening fields of the call record (``ledger.record.opening``),
  last, so it may hold anything.

On a Cluster a paid call's price taken before its record is appended waits
beside it, under the field ``<call id>`` + :data:`PRICE_SUFFIX`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

#: The replica field of a call handed to the ledger writer.
ORPHAN: Final = "orphan"
#: The field of a Cluster call's price, after its call id (``finish.lua``).
PRICE_SUFFIX: Final = ":p"
#: Hand a call to the ledger writer: its entry names no live replica any more.
ORPHAN_SCRIPT: Final = f"""
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then return 0 end
local cost, rest = string.match(v, '^(%d+)|[^|]*|(.*)$')
redis.call('HSET', KEYS[1], ARGV[1], cost .. '|{ORPHAN}|' .. rest)
return 1
"""


def key(licence_id: str) -> str:
    """The licence's in-flight hash."""
    return f"pdg:{{{licence_id}}}:inflight"


def marker(
    replica: str,
    kind: str,
    idempotent: bool,
    pool_key: str,
    paid_key: str,
    idempotency_key: str,
    record: bytes,
) -> bytes:
    """An entry without its cost (``reserve.lua`` puts ``cost|`` before it)."""
    head = "|".join((replica, kind, "1" if idempotent else "0", pool_key, paid_key, idempotency_key, ""))
    return head.encode() + record


@dataclass(frozen=True, slots=True)
class Entry:
    cost: int
    replica: str
    kind: str
    idempotent: bool
    #: The pool counter, the dataset's paid calls, the idempotency record.
    keys: tuple[str, str, str]
    #: The opening fields of the record, as ``ledger.record.opening`` wrote them.
    record: bytes


def parse(value: bytes) -> Entry:
    """An entry's value read back."""
    cost, replica, kind, idem, pool, paid, idem_key, record = value.split(b"|", 7)
    return Entry(
        int(cost),
        replica.decode(),
        kind.decode(),
        idem == b"1",
        (pool.decode(), paid.decode(), idem_key.decode()),
        record,
    )
