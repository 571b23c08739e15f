"""Closing a period into invoices, and reading them back.

**What a close bills.** Closing period ``P`` reads the ledger writer's last
record ``T`` (``ledger_state``) and bills the *served* calls of the call record:

* of period ``P`` with ``seq <= T`` -- lines of kind ``usage``;
* of earlier periods with ``A < seq <= T``, where ``A`` is the previous close's
  ``T`` -- lines of kind ``late``, labelled with the period the calls belong to.
  These are records that reached the ledger after their own period closed
  (they waited in the log while the database was down, say).

Periods close in order (the first one closed is the ledger's first period with
served calls) and only once they have ended in the billing time zone, so each
record is billed exactly once: by its own period's close, or as late usage by
the first close after it landed. Closing a closed period returns its invoices
unchanged; two closes of one period at once make one set of invoices (the
period's row is the guard: the second close's insert fails, and it answers
with what the first wrote).

**A close bills everything its period served** (:func:`close_billing`, what
the CLI and the admin API call): before it reads ``T`` it brings the ledger up
to date with the ledger writer's own code
(:meth:`ledger.writer.LedgerWriter.catch_up`, on a writer with a lock owner of
its own): the calls that dead replicas left unfinished are ended, the calls of
the period (or before) still in flight are waited for, and the call-record log
is moved into the ledger up to its newest entry. So records that waited in the
log after a gateway crash are billed in their own period, not as the next
period's late usage. If that cannot finish within its bounds the close is
refused and writes nothing (409 while calls stay in flight, 503
``ledger-unavailable`` when the log cannot be reached or moved), unless pending
calls are allowed: then it closes and answers what it left (``pending``),
which the next close bills as late usage. :func:`close_period` alone is the
SQL half (tests and the benchmark feed the ledger directly).

**What an invoice holds.** One invoice per licensee with billed calls, a line
per dataset, purpose, kind and terms version (and period, for late lines): its calls and
records, the exact charge (the calls' ``charge_e4`` summed, in 1/10000 fen),
the amount rounded half up to the fen once (:mod:`core.money`), and the
amount split by largest remainder by the revenue split of the terms its
calls were charged under: each call record names its terms version, and a
line holds the calls of one version (``terms_version``; records from before
versions are version 1), so a split changed mid-period splits each call its
own way. Free
(``public-interest``) calls are listed at zero. VAT is computed once on the
subtotal at the configured rate. The invoice is stored as canonical JSON with
the SHA-256 of those bytes (``content_hash``), next to its rows, and each call
it billed is copied (``invoice_calls``: seq, call id, charge), so that
reconciliation can name a call by its id even if the ledger lost it; all
billing tables are append-only, so a closed invoice's bytes never change.

The sums run in SQL (``GROUP BY`` over the call record), not in Python.
"""

from __future__ import annotations

import hashlib
import uuid
from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Final, cast
from zoneinfo import ZoneInfo

import orjson
from sqlalchemy import BigInteger, Table, and_, func, insert, literal, select
from sqlalchemy import cast as sql_cast
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from billing import register
from billing.models import BillingCloseRow, BillingDraftRow, InvoiceCallRow, InvoiceLineRow, InvoiceRow
from billing.register import Issuer
from config.settings import Settings
from core.errors import ConflictError, LedgerUnavailableError
from core.money import E4, e4_text, fen_of_e4, fen_to_e4, parse_vat_rate, split, vat_of
from ledger import admin_log
from ledger.chain import rfc3339
from ledger.models import CallRow, LedgerStateRow
from ledger.record import PREPAID_POOL, REPLAY_POOL, SERVED
from ledger.store import LedgerError
from ledger.writer import Waiting, build_writer
from licensing.models import DatasetRow, DatasetTermsRow, LicenseeRow, PrepaidTopUpRow
from metering.periods import Period, parse_period
from storage.redis import REDIS_ERRORS, EmbeddedValkeyError, RedisClient

_CALLS = cast(Table, CallRow.__table__)
_STATE = cast(Table, LedgerStateRow.__table__)
_CLOSES = cast(Table, BillingCloseRow.__table__)
_DRAFTS = cast(Table, BillingDraftRow.__table__)
_INVOICES = cast(Table, InvoiceRow.__table__)
_LINES = cast(Table, InvoiceLineRow.__table__)
_TERMS = cast(Table, DatasetTermsRow.__table__)
_BILLED = cast(Table, InvoiceCallRow.__table__)
_LICENSEES = cast(Table, LicenseeRow.__table__)
_DATASETS = cast(Table, DatasetRow.__table__)
_TOP_UPS = cast(Table, PrepaidTopUpRow.__table__)

FORMAT: Final = "pdg.invoice.v1"
#: Issued with identity (parties, currency, tax fields), a number and a due date.
FORMAT_V2: Final = "pdg.invoice.v2"
USAGE: Final = "usage"
#: The kinds of invoice: a period's (made by its close) and a top-up's.
PERIOD: Final = "period"
TOP_UP: Final = "top-up"
#: Lines of calls drawn from prepaid calls bought (billed at 0: paid when bought).
PREPAID: Final = "prepaid"
#: An invoice's status: a draft (computed when read, until issued), issued,
#: or closed (issued before drafts, numbers and the register).
DRAFT: Final = "draft"
ISSUED: Final = "issued"
LATE: Final = "late"


@dataclass(frozen=True, slots=True)
class Closed:
    """What closing a period did: the invoices, and whether they were already there."""

    period: str
    already_closed: bool
    after_seq: int
    through_seq: int
    closed_at: str
    invoices: list[dict[str, Any]]
    #: What the close left for the next period (only a close that was
    #: allowed to leave it: :func:`close_billing`); ``None`` when nothing.
    pending: dict[str, Any] | None = None
    #: The invoices are drafts (the period is closed, not yet issued).
    draft: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "period": self.period,
            "status": DRAFT if self.draft else ISSUED,
            "already_closed": self.already_closed,
            "after_seq": self.after_seq,
            "through_seq": self.through_seq,
            "closed_at": self.closed_at,
            "invoices": self.invoices,
            "drafts_hash": drafts_hash(self.invoices) if self.draft else None,
            "pending": self.pending,
        }


def drafts_hash(invoices: list[dict[str, Any]]) -> str:
    """One digest of a period's drafts (their content hashes, in id order):
    what finance reviewed, which an issue may be told to insist on."""
    joined = "\n".join(inv["content_hash"] for inv in sorted(invoices, key=lambda inv: inv["id"]))
    return hashlib.sha256(joined.encode()).hexdigest()


def billable(calls: Table = _CALLS) -> Any:
    """A record an invoice bills: served, and not a replay of an idempotent
    call already charged (served again, drawn on no pool, never billed)."""
    return and_(calls.c.outcome == SERVED, calls.c.pool.is_distinct_from(REPLAY_POOL))


def invoice_id(period: str, licensee_id: str) -> str:
    return f"inv-{period}-{licensee_id}"


def _fraction(basis_points: int) -> str:
    return str((Decimal(basis_points) / E4).normalize())


def canonical(invoice: dict[str, Any]) -> bytes:
    """An invoice's hashed bytes: compact JSON, sorted keys, without ``content_hash``."""
    return orjson.dumps(
        {k: v for k, v in invoice.items() if k != "content_hash"}, option=orjson.OPT_SORT_KEYS
    )


#: The steps of a close, as ``progress(done, STEPS)`` counts them.
STEPS: Final = 4
Progress = Callable[[int, int], None]


def _quiet(done: int, total: int) -> None:
    return None


async def close_period(
    engine: AsyncEngine,
    period: Period,
    *,
    vat_rate: Decimal,
    now: datetime,
    issuer: Issuer,
    progress: Progress | None = None,
) -> Closed:
    """Issue ``period``'s invoices (see the module docstring), numbered,
    registered and signed by ``issuer``; ConflictError when they may not be
    issued yet. ``progress(done, STEPS)`` after each step: the usage summed,
    the late usage summed, the invoices written, the calls copied."""
    _ended(period, now)
    try:
        async with engine.begin() as conn:
            done = await _existing(conn, period.name)
            if done is not None:
                return done
            return await _close(conn, period, vat_rate, now, progress or _quiet, issuer)
    except (IntegrityError, ConflictError):
        # Another close of this period committed first (the insert collided,
        # or the order check already saw its close): answer with its invoices.
        async with engine.connect() as conn:
            done = await _existing(conn, period.name)
        if done is None:
            raise
        return done


def _ended(period: Period, now: datetime) -> None:
    if now < period.end:
        raise ConflictError(f"period {period.name} has not ended (it ends at {rfc3339(period.end)})")


RedisOpener = Callable[[], AbstractAsyncContextManager[RedisClient]]


async def close_billing(
    engine: AsyncEngine,
    period: Period,
    *,
    settings: Settings,
    redis: RedisOpener,
    now: datetime,
    allow_pending: bool = False,
    issue: bool = False,
    progress: Progress | None = None,
) -> Closed:
    """Close ``period`` for review (``pdg billing close``, ``POST
    /admin/v1/billing/{period}/close``): first bring the ledger up to date
    (see the module docstring), then hold the period as drafts — invoices
    computed from the call record whenever they are read, so a late record
    that lands before the issue is in them — until :func:`issue_billing`.
    With ``issue``, issue them at once. An issued period answers its
    invoices.

    ``redis()`` opens the deployment's Redis (the CLI's starts the embedded
    Valkey when it is not running). When the ledger cannot be brought up to
    date the close is refused and writes nothing: ConflictError (409) while
    calls of the period stay in flight, LedgerUnavailableError (503) when the
    log cannot be reached or moved; either carries ``pending`` (what is
    left). With ``allow_pending`` it closes anyway and answers what it left
    in ``Closed.pending``: those calls reach the ledger later, and are in the
    drafts (or, once issued, the next period's late usage)."""
    _ended(period, now)
    async with engine.connect() as conn:
        done = await _existing(conn, period.name)
        if done is not None:
            return done
        try:
            await _in_order(conn, period)
        except ConflictError:
            done = await _existing(conn, period.name)
            if done is None:
                raise
            return done
    step = progress or _quiet
    waiting = await _ledger_up_to_date(engine, period, settings, redis, allow_pending, "closed")
    step(1, STEPS + 1)
    await _hold_as_drafts(engine, period, now)
    if issue:
        return await _issue(engine, period, settings, now, step, waiting)
    return _left(await drafts(engine, period, settings), waiting)


async def issue_billing(
    engine: AsyncEngine,
    period: Period,
    *,
    settings: Settings,
    redis: RedisOpener,
    now: datetime,
    allow_pending: bool = False,
    expect_drafts: str | None = None,
    progress: Progress | None = None,
) -> Closed:
    """Issue a closed period's invoices (``pdg billing issue``, ``POST
    /admin/v1/billing/{period}/issue``): the ledger brought up to date again,
    then the drafts as they are now made final — numbered, signed into the
    billing register, immutable. ConflictError when the period was not
    closed for review, or when ``expect_drafts`` (a ``drafts_hash`` finance
    reviewed) no longer matches the drafts. An issued period answers its
    invoices."""
    _ended(period, now)
    async with engine.connect() as conn:
        done = await _existing(conn, period.name)
        if done is not None:
            return done
        held = await conn.scalar(select(_DRAFTS.c.period).where(_DRAFTS.c.period == period.name))
    if held is None:
        raise ConflictError(f"close {period.name} first: its invoices are reviewed as drafts, then issued")
    step = progress or _quiet
    waiting = await _ledger_up_to_date(engine, period, settings, redis, allow_pending, "issued")
    step(1, STEPS + 1)
    if expect_drafts is not None:
        current = await drafts(engine, period, settings)
        if not current.already_closed and drafts_hash(current.invoices) != expect_drafts:
            raise ConflictError(
                f"the drafts of {period.name} changed since they were reviewed (late records arrived): "
                "review them again",
                drafts_hash=drafts_hash(current.invoices),
            )
    return await _issue(engine, period, settings, now, step, waiting)


async def _issue(
    engine: AsyncEngine, period: Period, settings: Settings, now: datetime, step: Progress, waiting: Waiting
) -> Closed:
    """:func:`close_period` with the deployment's issuer, once the ledger is up to date."""
    closed = await close_period(
        engine,
        period,
        vat_rate=parse_vat_rate(settings.billing.vat_rate),
        now=now,
        issuer=Issuer.from_settings(settings),
        progress=lambda done, total: step(done + 1, total + 1),
    )
    return _left(closed, waiting)


def _left(closed: Closed, waiting: Waiting) -> Closed:
    """``closed`` naming what the ledger could not take in first (if anything)."""
    if waiting and not closed.already_closed:
        return replace(closed, pending=waiting.as_dict())
    return closed


async def _ledger_up_to_date(
    engine: AsyncEngine,
    period: Period,
    settings: Settings,
    redis: RedisOpener,
    allow_pending: bool,
    done: str,
) -> Waiting:
    """The ledger caught up, or the refusal (unless pending calls are allowed)."""
    waiting = await _catch_up(engine, period, settings, redis)
    if waiting and not allow_pending:
        detail = (
            f"{waiting.reason}; nothing was {done} (--allow-pending, or allow_pending=true, goes on "
            "anyway: what is left is billed when it lands, as late usage once the period is issued)"
        )
        if waiting.busy:
            raise ConflictError(detail, pending=waiting.as_dict())
        raise LedgerUnavailableError(detail, headers={"Retry-After": "5"}, pending=waiting.as_dict())
    return waiting


async def _hold_as_drafts(engine: AsyncEngine, period: Period, now: datetime) -> None:
    """The period's draft mark (once), with its admin log entry."""
    try:
        async with engine.begin() as conn:
            if await conn.scalar(select(_DRAFTS.c.period).where(_DRAFTS.c.period == period.name)) is None:
                await conn.execute(insert(_DRAFTS).values(period=period.name, opened_at=now))
                await admin_log.record(conn, "billing.close", period.name, after={"period": period.name})
    except IntegrityError:
        pass  # another close marked it a moment ago


async def drafts(engine: AsyncEngine, period: Period, settings: Settings) -> Closed:
    """The drafts of a period closed for review, computed from the call
    record as it is now (one read transaction); an issued period's invoices
    as issued. Their ``closed_at`` is when the period was closed, so the
    same records give the same drafts, byte for byte."""
    async with engine.begin() as conn:
        done = await _existing(conn, period.name)
        if done is not None:
            return done
        opened = await conn.scalar(select(_DRAFTS.c.opened_at).where(_DRAFTS.c.period == period.name))
        if opened is None:
            raise ConflictError(f"{period.name} is not closed")
        after, through, usage, splits = await _usage(conn, period)
        identity = await load_identity(conn, settings, usage)
    invoices = build_invoices(
        usage,
        splits,
        period=period.name,
        after=after,
        through=through,
        vat_rate=parse_vat_rate(settings.billing.vat_rate),
        closed_at=rfc3339(opened),
        status=DRAFT,
        identity=identity,
    )
    for invoice in invoices:
        invoice.update(number=None, issued_at=None, due_at=None)
        seal(invoice).pop("_content")
    return Closed(period.name, False, after, through, rfc3339(opened), invoices, draft=True)


async def _catch_up(engine: AsyncEngine, period: Period, settings: Settings, redis: RedisOpener) -> Waiting:
    """The ledger writer's :meth:`~ledger.writer.LedgerWriter.catch_up`, on a
    writer of its own (its own lock owner); what it could not do."""
    try:
        async with redis() as client:
            writer = build_writer(settings, engine, client, owner=f"close:{uuid.uuid4().hex}")
            return await writer.catch_up(period.name)
    except (*REDIS_ERRORS, EmbeddedValkeyError) as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return Waiting(period.name, f"the call-record log cannot be reached ({why})", None, None)
    except LedgerError as exc:
        return Waiting(period.name, f"the ledger cannot be written ({exc})", None, None)


async def _existing(conn: AsyncConnection, period: str) -> Closed | None:
    row = (await conn.execute(select(_CLOSES).where(_CLOSES.c.period == period))).first()
    if row is None:
        return None
    invoices = await _invoices(conn, _INVOICES.c.period == period, _INVOICES.c.kind == PERIOD)
    return Closed(period, True, row.after_seq, row.through_seq, rfc3339(row.closed_at), invoices)


async def _in_order(conn: AsyncConnection, period: Period) -> int:
    """ConflictError unless ``period`` is the next to close; the ``through_seq``
    of the close before it (0 for the first)."""
    name = period.name
    last = (await conn.execute(select(_CLOSES).order_by(_CLOSES.c.period.desc()).limit(1))).first()
    if last is not None:
        if last.period > name:
            raise ConflictError(
                f"periods close in order: {last.period} is closed, so {name} can no longer be"
            )
        expected = parse_period(last.period, period.tz).next().name
        if name != expected:
            raise ConflictError(f"periods close in order: close {expected} first")
        return int(last.through_seq)
    first = await conn.scalar(select(func.min(_CALLS.c.period)).where(_CALLS.c.outcome == SERVED))
    if first is not None and first < name:
        raise ConflictError(f"periods close in order: close {first} first (the ledger's first period)")
    return 0


@dataclass(frozen=True, slots=True)
class Usage:
    """One group of billed calls, summed in SQL."""

    kind: str
    licensee: str
    dataset: str
    purpose: str
    period: str
    terms_version: int
    calls: int
    records: int
    charge_e4: int
    first_seq: int
    #: Calls drawn from prepaid calls bought (kind ``prepaid``): what they
    #: were bought at, summed (1/10000 fen); 0 otherwise.
    prepaid_e4: int = 0


def bought_positions(calls: Table = _CALLS) -> Any:
    """The served calls drawn from prepaid calls a top-up bought, with the
    unit price paid for each (``seq``, ``unit_price_e4``): a licence's
    prepaid calls are drawn in ``seq`` order, the n-th from position n of
    its balance, and a top-up bought positions ``first_position + 1 ..
    first_position + calls`` (``billing.prepaid``). Positions no top-up
    bought were granted: billed at list price, as credit calls are."""
    bought = _TOP_UPS
    drawn = (
        select(
            calls.c.seq,
            calls.c.licence_id,
            func.row_number().over(partition_by=calls.c.licence_id, order_by=calls.c.seq).label("position"),
        )
        .where(
            billable(calls),
            calls.c.pool == PREPAID_POOL,
            calls.c.licensee_id.in_(select(bought.c.licensee_id)),
            calls.c.licence_id.in_(select(bought.c.licence_id)),
        )
        .subquery("drawn")
    )
    return (
        select(drawn.c.seq, bought.c.unit_price_e4)
        .join(
            bought,
            and_(
                bought.c.licence_id == drawn.c.licence_id,
                drawn.c.position > bought.c.first_position,
                drawn.c.position <= bought.c.first_position + bought.c.calls,
            ),
        )
        .subquery("bought")
    )


def _billed(name: str, after: int, through: int) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """The conditions of the period's own calls and of its late ones."""
    served = billable()
    usage = (served, _CALLS.c.period == name, _CALLS.c.seq <= through)
    late = (served, and_(_CALLS.c.period < name, _CALLS.c.seq > after, _CALLS.c.seq <= through))
    return usage, late


async def _aggregate(conn: AsyncConnection, where: tuple[Any, ...], kind: str) -> list[Usage]:
    """The calls ``where`` selects, summed per licensee, dataset, purpose,
    period and terms version (records from before terms had versions were
    charged under version 1); the calls drawn from prepaid calls bought
    apart, as kind ``prepaid`` (:func:`bought_positions`)."""
    version = func.coalesce(_CALLS.c.terms_version, 1)
    groups = [_CALLS.c.licensee_id, _CALLS.c.dataset_id, _CALLS.c.purpose, _CALLS.c.period, version]
    source: Any = _CALLS
    drawn: Any = literal(False)
    paid: Any = literal(0)
    if await conn.scalar(select(_TOP_UPS.c.id).limit(1)) is not None:
        bought = bought_positions()
        source = _CALLS.outerjoin(bought, bought.c.seq == _CALLS.c.seq)
        drawn = bought.c.seq.is_not(None)
        paid = sql_cast(func.sum(bought.c.unit_price_e4), BigInteger)
        groups.append(drawn)
    query = select(
        *groups[:5],
        drawn,
        func.count(),
        sql_cast(func.sum(_CALLS.c.records), BigInteger),
        sql_cast(func.sum(_CALLS.c.charge_e4), BigInteger),
        func.min(_CALLS.c.seq),
        paid,
    )
    rows = await conn.execute(query.select_from(source).where(*where).group_by(*groups))
    return [
        Usage(
            PREPAID if prepaid else kind,
            licensee,
            dataset,
            purpose,
            period,
            int(terms),
            int(calls),
            int(recs or 0),
            int(charge or 0),
            int(first),
            int(value or 0) if prepaid else 0,
        )
        for licensee, dataset, purpose, period, terms, prepaid, calls, recs, charge, first, value in rows
    ]


def _line(usage: Usage, basis: tuple[int, int, int]) -> dict[str, Any]:
    """A line of usage: its amount the exact charge rounded once, split by
    ``basis``. Calls drawn from prepaid calls bought were paid for when
    bought: their line is at 0, and what they were bought at (rounded once)
    is split now, as they are used."""
    prepaid = usage.kind == PREPAID
    amount = 0 if prepaid else fen_of_e4(usage.charge_e4)
    provider, operator, fund = split(fen_of_e4(usage.prepaid_e4) if prepaid else amount, basis)
    extra = {"prepaid_value_fen": e4_text(usage.prepaid_e4)} if prepaid else {}
    return extra | {
        "dataset": usage.dataset,
        "purpose": usage.purpose,
        "kind": usage.kind,
        "usage_period": usage.period,
        "terms_version": usage.terms_version,
        "calls": usage.calls,
        "records": usage.records,
        "charge_fen": "0" if prepaid else e4_text(usage.charge_e4),
        "amount_fen": amount,
        "split": {"provider_fen": provider, "operator_fen": operator, "public_fund_fen": fund},
        "revenue_split": {
            "provider": _fraction(basis[0]),
            "operator": _fraction(basis[1]),
            "public_fund": _fraction(basis[2]),
        },
    }


@dataclass(frozen=True, slots=True)
class Identity:
    """Who an issued invoice names, copied in when it is made so that the
    document never changes: the seller (the operating company), each
    buyer (a licensee), each dataset's name and tax classification code,
    the currency."""

    seller: dict[str, str]
    #: By licensee id: ``name``, ``credit_code``, ``address``, ``bank``, ``account``.
    buyers: dict[str, dict[str, str]]
    #: By dataset id: (name, tax classification code, VAT rate, provider department).
    datasets: dict[str, tuple[str, str, Decimal, str]]
    currency: str = "CNY"


def build_invoices(
    usage: list[Usage],
    splits: dict[tuple[str, int], tuple[int, int, int]],
    *,
    period: str,
    after: int,
    through: int,
    vat_rate: Decimal,
    closed_at: str,
    status: str = "closed",
    identity: Identity | None = None,
) -> list[dict[str, Any]]:
    """The period's invoices from its billed usage (pure): one per licensee,
    its lines in a fixed order and numbered, VAT on the subtotal; with
    ``identity``, the parties, the currency and each line's dataset name,
    tax code and VAT rate. Not yet sealed (:func:`seal`)."""
    by_licensee: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for group in usage:
        by_licensee[group.licensee].append(_line(group, splits[group.dataset, group.terms_version]))
    invoices: list[dict[str, Any]] = []
    for licensee in sorted(by_licensee):
        lines = sorted(
            by_licensee[licensee],
            key=lambda line: (
                line["kind"] != USAGE,
                line["usage_period"],
                line["dataset"],
                line["purpose"],
                line["terms_version"],
                line["kind"],
            ),
        )
        for number, line in enumerate(lines, 1):
            line["line_no"] = number
            if identity is not None:
                name, tax_code, rate, provider = identity.datasets.get(
                    line["dataset"], (line["dataset"], "", vat_rate, "")
                )
                line.update(dataset_name=name, tax_code=tax_code, vat_rate=str(rate), provider=provider)
        subtotal = sum(line["amount_fen"] for line in lines)
        groups = vat_groups(lines, vat_rate) if identity is not None else []
        vat = sum(g["vat_fen"] for g in groups) if groups else vat_of(subtotal, vat_rate)
        invoice: dict[str, Any] = {
            "format": FORMAT if identity is None else FORMAT_V2,
            "id": invoice_id(period, licensee),
            "licensee_id": licensee,
            "period": period,
            "status": status,
            "closed_at": closed_at,
            "covers": {"after_seq": after, "through_seq": through},
            "calls": sum(line["calls"] for line in lines),
            "lines": lines,
            "subtotal_fen": subtotal,
            "vat_rate": invoice_rate(groups, vat_rate),
            "vat_fen": vat,
            "total_fen": subtotal + vat,
        }
        if identity is not None:
            invoice.update(
                vat_groups=groups,
                currency=identity.currency,
                seller=identity.seller,
                buyer=identity.buyers.get(licensee, {"name": "", "credit_code": ""}),
            )
        invoices.append(invoice)
    return invoices


#: An invoice's ``vat_rate`` when its billed lines carry several rates.
MIXED: Final = "mixed"


def vat_groups(lines: list[dict[str, Any]], default: Decimal) -> list[dict[str, Any]]:
    """VAT per rate: the billed lines (amount above 0) of each rate summed,
    VAT rounded half up once per rate, by rate; a single group at
    ``default`` with 0 when nothing is billed."""
    amounts: dict[Decimal, int] = defaultdict(int)
    for line in lines:
        if line["amount_fen"]:
            amounts[Decimal(line["vat_rate"])] += line["amount_fen"]
    if not amounts:
        amounts[default] = 0
    return [
        {"vat_rate": str(rate), "amount_fen": amount, "vat_fen": vat_of(amount, rate)}
        for rate, amount in sorted(amounts.items())
    ]


def invoice_rate(groups: list[dict[str, Any]], default: Decimal) -> str:
    """An invoice's ``vat_rate``: its one rate, or ``mixed``."""
    if not groups:
        return str(default)
    return str(groups[0]["vat_rate"]) if len(groups) == 1 else MIXED


def seal(document: dict[str, Any]) -> dict[str, Any]:
    """``document`` with the SHA-256 of its canonical bytes (``content_hash``;
    ``_content`` holds the bytes, for storing)."""
    content = canonical({k: v for k, v in document.items() if k != "_content"})
    document["content_hash"] = hashlib.sha256(content).hexdigest()
    document["_content"] = content
    return document


async def _store(
    conn: AsyncConnection,
    invoices: list[dict[str, Any]],
    splits: dict[tuple[str, int], tuple[int, int, int]],
    *,
    period: str,
    after: int,
    through: int,
    first_seq: int,
    vat_rate: Decimal,
    now: datetime,
) -> None:
    """The close's row, then its invoices and their lines (the period's row
    first: a second close of the period fails there)."""
    rate = str(vat_rate)
    await conn.execute(
        insert(_CLOSES).values(
            period=period,
            after_seq=after,
            through_seq=through,
            first_seq=first_seq,
            vat_rate=rate,
            invoices=len(invoices),
            closed_at=now,
        )
    )
    await store_invoices(conn, invoices, lambda line: splits[line["dataset"], line["terms_version"]], now=now)


async def store_invoices(
    conn: AsyncConnection,
    invoices: list[dict[str, Any]],
    basis_of: Callable[[dict[str, Any]], tuple[int, int, int]],
    *,
    now: datetime,
) -> None:
    """Sealed invoices (:func:`seal`) as rows: each invoice and its lines,
    each line with the revenue split it applied in basis points (``basis_of``)."""
    if not invoices:
        return
    await conn.execute(
        insert(_INVOICES),
        [
            {
                "id": inv["id"],
                "kind": inv.get("kind", PERIOD),
                "licensee_id": inv["licensee_id"],
                "period": inv["period"],
                "status": inv["status"],
                "calls": inv["calls"],
                "subtotal_fen": inv["subtotal_fen"],
                "vat_rate": inv["vat_rate"],
                "vat_fen": inv["vat_fen"],
                "total_fen": inv["total_fen"],
                "closed_at": now,
                "content_hash": inv["content_hash"],
                "content": inv.pop("_content").decode(),
                "number": inv.get("number"),
                "issued_at": now if inv.get("number") else None,
                "due_at": inv.get("due_at"),
            }
            for inv in invoices
        ],
    )
    line_rows = []
    for inv in invoices:
        for line in inv["lines"]:
            basis = basis_of(line)
            line_rows.append(
                {
                    "invoice_id": inv["id"],
                    "line_no": line["line_no"],
                    "dataset_id": line["dataset"],
                    "purpose": line["purpose"],
                    "kind": line["kind"],
                    "usage_period": line["usage_period"],
                    "calls": line["calls"],
                    "records": line["records"],
                    "charge_e4": fen_to_e4(line["charge_fen"]),
                    "amount_fen": line["amount_fen"],
                    "provider_fen": line["split"]["provider_fen"],
                    "operator_fen": line["split"]["operator_fen"],
                    "public_fund_fen": line["split"]["public_fund_fen"],
                    "split_provider": basis[0],
                    "split_operator": basis[1],
                    "split_public_fund": basis[2],
                    "terms_version": line["terms_version"],
                }
            )
    await conn.execute(insert(_LINES), line_rows)


async def _copy_billed(conn: AsyncConnection, period: str, wheres: tuple[tuple[Any, ...], ...]) -> None:
    """Each call billed, copied in the database (a million rows never pass
    through Python): seq, call id, invoice, charge."""
    prefix = literal(invoice_id(period, ""))
    for where in wheres:
        await conn.execute(
            insert(_BILLED).from_select(
                ["seq", "call_id", "invoice_id", "charge_e4"],
                select(
                    _CALLS.c.seq, _CALLS.c.call_id, prefix + _CALLS.c.licensee_id, _CALLS.c.charge_e4
                ).where(*where),
            )
        )
    if conn.dialect.name == "postgresql":
        # A million new rows: give the planner their statistics now, not at
        # autovacuum's next round (reconciliation reads them right after).
        await conn.exec_driver_sql("ANALYZE invoice_calls")


async def _close(
    conn: AsyncConnection,
    period: Period,
    vat_rate: Decimal,
    now: datetime,
    progress: Progress,
    issuer: Issuer,
) -> Closed:
    """The order check, the usage summed, the invoices built, numbered,
    registered, stored, and the billed calls copied: one transaction."""
    name = period.name
    after, through, usage, splits = await _usage(conn, period, progress)
    closed_at = rfc3339(now)
    identity = await load_identity(conn, issuer.settings, usage)
    invoices = build_invoices(
        usage,
        splits,
        period=name,
        after=after,
        through=through,
        vat_rate=vat_rate,
        closed_at=closed_at,
        status=ISSUED,
        identity=identity,
    )
    for invoice in invoices:
        await number_and_register(conn, issuer, invoice, now)
    first_seq = min((u.first_seq for u in usage), default=0)
    await _store(
        conn,
        invoices,
        splits,
        period=name,
        after=after,
        through=through,
        first_seq=first_seq,
        vat_rate=vat_rate,
        now=now,
    )
    progress(3, STEPS)
    if invoices:
        await _copy_billed(conn, name, _billed(name, after, through))
    progress(4, STEPS)
    await admin_log.record(
        conn,
        "billing.issue",
        name,
        after={
            "period": name,
            "after_seq": after,
            "through_seq": through,
            "invoices": [invoice["id"] for invoice in invoices],
            "subtotal_fen": sum(int(invoice["subtotal_fen"]) for invoice in invoices),
        },
    )
    return Closed(name, False, after, through, closed_at, invoices)


async def number_and_register(
    conn: AsyncConnection, issuer: Issuer, invoice: dict[str, Any], now: datetime
) -> None:
    """Issue ``invoice`` at ``now``: its number (the invoice series), issue
    and due dates, sealed, and its entry in the billing register."""
    settings = issuer.settings.billing
    due = now.astimezone(ZoneInfo(settings.time_zone)).date() + timedelta(days=settings.payment_terms_days)
    numbered = await register.next_number(conn, issuer.settings, register.INVOICE, now)
    invoice.update(number=numbered.number, issued_at=rfc3339(now), due_at=due.isoformat())
    seal(invoice)
    await register.register(
        conn,
        issuer.signer,
        numbered,
        document_id=invoice["id"],
        issued_at=now,
        content_hash=invoice["content_hash"],
    )


async def _usage(
    conn: AsyncConnection, period: Period, progress: Progress = _quiet
) -> tuple[int, int, list[Usage], dict[tuple[str, int], tuple[int, int, int]]]:
    """What ``period`` bills now: the order check, then its own and its late
    usage up to the ledger's newest record, and their revenue splits."""
    name = period.name
    after = await _in_order(conn, period)
    state = await conn.scalar(select(_STATE.c.next_seq))
    through = int(state) - 1 if state is not None else 0
    usage_where, late_where = _billed(name, after, through)
    usage = await _aggregate(conn, usage_where, USAGE)
    progress(1, STEPS)
    usage += await _aggregate(conn, late_where, LATE)
    progress(2, STEPS)
    splits = await _splits(conn, {(u.dataset, u.terms_version) for u in usage})
    return after, through, usage, splits


async def load_identity(conn: AsyncConnection, settings: Settings, usage: list[Usage]) -> Identity:
    """The parties of ``usage``'s invoices, and each dataset's name, tax code,
    VAT rate and provider department, as they are now (copied into the
    invoice when it is made: a later change of the catalogue never moves an
    issued invoice nor its payouts)."""
    licensees = sorted({u.licensee for u in usage})
    datasets = sorted({u.dataset for u in usage})
    buyers: dict[str, dict[str, str]] = {}
    if licensees:
        rows = await conn.execute(select(_LICENSEES).where(_LICENSEES.c.id.in_(licensees)))
        buyers = {r.id: party_of(r) for r in rows}
    names: dict[str, tuple[str, str, Decimal, str]] = {}
    if datasets:
        rows = await conn.execute(
            select(
                _DATASETS.c.id,
                _DATASETS.c.name,
                _DATASETS.c.tax_code,
                _DATASETS.c.vat_rate,
                _DATASETS.c.provider,
            ).where(_DATASETS.c.id.in_(datasets))
        )
        default = parse_vat_rate(settings.billing.vat_rate)
        names = {
            r.id: (
                r.name,
                r.tax_code or settings.billing.tax_code,
                parse_vat_rate(r.vat_rate) if r.vat_rate else default,
                r.provider,
            )
            for r in rows
        }
    return Identity(seller=party_of(settings.billing.seller), buyers=buyers, datasets=names)


PARTY_FIELDS: Final = ("name", "credit_code", "address", "bank", "account")


def party_of(source: Any) -> dict[str, str]:
    """A document's seller or buyer, from the settings' seller or a licensee row."""
    return {name: str(getattr(source, name, "") or "") for name in PARTY_FIELDS}


async def _splits(
    conn: AsyncConnection, wanted: set[tuple[str, int]]
) -> dict[tuple[str, int], tuple[int, int, int]]:
    """The revenue split of each (dataset, terms version) billed."""
    found: dict[tuple[str, int], tuple[int, int, int]] = {}
    if wanted:
        rows = await conn.execute(
            select(
                _TERMS.c.dataset_id,
                _TERMS.c.version,
                _TERMS.c.split_provider,
                _TERMS.c.split_operator,
                _TERMS.c.split_public_fund,
            ).where(_TERMS.c.dataset_id.in_(sorted({dataset for dataset, _ in wanted})))
        )
        found = {
            (r.dataset_id, int(r.version)): (
                int(r.split_provider),
                int(r.split_operator),
                int(r.split_public_fund),
            )
            for r in rows
        }
    missing = sorted(wanted - found.keys())
    if missing:
        dataset, version = missing[0]
        raise ConflictError(
            f"dataset {dataset} has no terms version {version}, which the call record names: "
            "its revenue split is unknown"
        )
    return {key: found[key] for key in wanted}


async def _invoices(conn: AsyncConnection, *where: Any) -> list[dict[str, Any]]:
    rows = await conn.execute(
        select(_INVOICES.c.content, _INVOICES.c.content_hash).where(*where).order_by(_INVOICES.c.id)
    )
    return [{**orjson.loads(r.content), "content_hash": r.content_hash} for r in rows]


async def list_invoices(
    engine: AsyncEngine,
    *,
    period: str | None = None,
    licensee_id: str | None = None,
    settings: Settings | None = None,
) -> list[dict[str, Any]]:
    """Issued invoices, by id; of one period and/or one licensee. With
    ``settings``, the drafts of the period closed for review too."""
    where = []
    if period is not None:
        where.append(_INVOICES.c.period == period)
    if licensee_id is not None:
        where.append(_INVOICES.c.licensee_id == licensee_id)
    async with engine.connect() as conn:
        found = await _invoices(conn, *where)
        held = await _held(conn) if settings is not None else None
    if settings is not None and held is not None and period in (None, held):
        drafted = await drafts(engine, parse_period(held, ZoneInfo(settings.billing.time_zone)), settings)
        if drafted.draft:
            found += [inv for inv in drafted.invoices if licensee_id in (None, inv["licensee_id"])]
    return found


async def _held(conn: AsyncConnection) -> str | None:
    """The period closed for review and not yet issued, if any."""
    return cast(
        "str | None",
        await conn.scalar(
            select(_DRAFTS.c.period).where(_DRAFTS.c.period.not_in(select(_CLOSES.c.period))).limit(1)
        ),
    )


async def get_invoice(
    engine: AsyncEngine, invoice: str, settings: Settings | None = None
) -> dict[str, Any] | None:
    """An issued invoice; with ``settings``, or a draft of the period closed for review."""
    async with engine.connect() as conn:
        found = await _invoices(conn, _INVOICES.c.id == invoice)
        held = await _held(conn) if not found and settings is not None else None
    if found:
        return found[0]
    if held is None or settings is None or not invoice.startswith(f"inv-{held}-"):
        return None
    drafted = await drafts(engine, parse_period(held, ZoneInfo(settings.billing.time_zone)), settings)
    return next((inv for inv in drafted.invoices if inv["id"] == invoice), None)
