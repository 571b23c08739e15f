"""Prepaid calls as money: top-ups invoiced when bought, and the balance.

A licence with prepaid terms (``paid.prepaid_calls``) draws its
``industrial`` calls from a balance of calls. The balance's limit holds
calls of two sorts:

* **bought**: a top-up (``POST /admin/v1/licences/{id}/top-ups``, ``pdg
  licence top-up``) is a purchase. It raises the limit by its calls and is
  invoiced at once (:func:`invoicer`): an issued invoice of kind ``top-up``,
  numbered in the invoice series and signed into the billing register, for
  calls x the unit price paid (the licence's agreed
  ``paid.prepaid_unit_price_fen`` unless the top-up names one), rounded half
  up to the fen once, VAT at ``billing.vat_rate``, due like any invoice and
  paid like any invoice. Its line's revenue split is 0: the money is not
  earned until the calls are used.
* **granted**: calls the licence's terms give without a purchase (the
  ``prepaid_calls`` a licence was issued with, or a higher limit set by a
  PATCH). They are billed at list price on the monthly invoice, as credit
  calls are.

Calls are drawn in the order the call record holds them (``seq``): the n-th
prepaid call of a licence takes position n of its balance, and a top-up buys
the positions after the limit it found (what the licence held before comes
first). A position is fixed once its call is in the ledger, so the same
records always give the same invoices. On the monthly invoice the calls drawn
from bought positions are lines of kind ``prepaid`` at amount 0, with their
calls and records, and what they were bought at (``prepaid_value_fen``) is
split between provider, operator and fund by the terms each call was served
under, in the period they were used (:mod:`billing.invoices`).

Calls bought are never taken back: a PATCH may not lower the limit below the
last position bought, nor end the prepaid terms (a credit note on the top-up
invoice refunds unused calls in money).

The balance (:func:`balance`) is read from the call record (calls the ledger
holds; calls still in flight or in the call-record log are not yet in it):
calls used and left in all, and for each top-up its calls used and left and
what is left in money.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final, cast
from zoneinfo import ZoneInfo

from sqlalchemy import Table, func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from billing.invoices import (
    FORMAT_V2,
    ISSUED,
    TOP_UP,
    billable,
    number_and_register,
    party_of,
    store_invoices,
)
from billing.register import Issuer
from config.settings import Settings
from core.errors import NotFoundError
from core.money import e4_text, e4_to_fen, fen_of_e4, parse_vat_rate, vat_of
from ledger.chain import rfc3339
from ledger.models import CallRow, LedgerStateRow
from ledger.record import PREPAID_POOL
from licensing.models import LicenceRow, LicenseeRow, PrepaidTopUpRow
from licensing.registry import TopUpInvoicer
from metering.periods import period_of

_CALLS = cast(Table, CallRow.__table__)
_STATE = cast(Table, LedgerStateRow.__table__)
_TOP_UPS = cast(Table, PrepaidTopUpRow.__table__)
_LICENCES = cast(Table, LicenceRow.__table__)
_LICENSEES = cast(Table, LicenseeRow.__table__)

#: A top-up's line has no revenue split: it is split as its calls are used.
_UNSPLIT: Final = {"provider_fen": 0, "operator_fen": 0, "public_fund_fen": 0}


def top_up_invoice(
    top_up: PrepaidTopUpRow, *, buyer: dict[str, str], settings: Settings, now: datetime
) -> dict[str, Any]:
    """The invoice of a top-up (pure), not yet numbered nor sealed."""
    tz = ZoneInfo(settings.billing.time_zone)
    rate = parse_vat_rate(settings.billing.vat_rate)
    charge = top_up.calls * top_up.unit_price_e4
    amount = fen_of_e4(charge)
    vat = vat_of(amount, rate)
    period = period_of(now, tz).name
    price = e4_to_fen(top_up.unit_price_e4)
    line = {
        "line_no": 1,
        "kind": TOP_UP,
        "dataset": "",
        "dataset_name": "",
        "purpose": "industrial",
        "usage_period": period,
        "terms_version": None,
        "licence_id": top_up.licence_id,
        "calls": top_up.calls,
        "records": 0,
        "unit_price_fen": price,
        "charge_fen": e4_text(charge),
        "amount_fen": amount,
        "split": dict(_UNSPLIT),
        "revenue_split": {"provider": "0", "operator": "0", "public_fund": "0"},
        "tax_code": settings.billing.tax_code,
        "vat_rate": str(rate),
    }
    return {
        "format": FORMAT_V2,
        "kind": TOP_UP,
        "id": f"inv-{top_up.id}",
        "licensee_id": top_up.licensee_id,
        "period": period,
        "status": ISSUED,
        "closed_at": rfc3339(now),
        "covers": None,
        "calls": top_up.calls,
        "lines": [line],
        "subtotal_fen": amount,
        "vat_rate": str(rate),
        "vat_groups": [{"vat_rate": str(rate), "amount_fen": amount, "vat_fen": vat}],
        "vat_fen": vat,
        "total_fen": amount + vat,
        "currency": "CNY",
        "seller": party_of(settings.billing.seller),
        "buyer": buyer,
        "top_up": {
            "id": top_up.id,
            "licence_id": top_up.licence_id,
            "calls": top_up.calls,
            "first_position": top_up.first_position,
            "unit_price_fen": price,
        },
    }


def invoicer(settings: Settings, now: datetime, issuer: Issuer | None = None) -> TopUpInvoicer:
    """What bills a top-up in the transaction that makes it
    (:meth:`licensing.registry.Registry.top_up`): its invoice issued at
    ``now``, numbered, registered and stored; its id."""

    async def bill(conn: AsyncConnection, top_up: PrepaidTopUpRow) -> str:
        signer = issuer or Issuer.from_settings(settings)
        row = (await conn.execute(select(_LICENSEES).where(_LICENSEES.c.id == top_up.licensee_id))).first()
        buyer = party_of(row) if row is not None else party_of(None)
        invoice = top_up_invoice(top_up, buyer=buyer, settings=settings, now=now)
        await number_and_register(conn, signer, invoice, now)
        await store_invoices(conn, [invoice], lambda _line: (0, 0, 0), now=now)
        return str(invoice["id"])

    return bill


async def balance(engine: AsyncEngine, licence_id: str) -> dict[str, Any]:
    """A prepaid licence's balance as the call record holds it (see the
    module docstring); NotFoundError for a licence without prepaid terms."""
    async with engine.connect() as conn:
        licence = (
            await conn.execute(
                select(_LICENCES.c.licensee_id, _LICENCES.c.paid_prepaid_calls).where(
                    _LICENCES.c.id == licence_id
                )
            )
        ).first()
        if licence is None or licence.paid_prepaid_calls is None:
            raise NotFoundError(f"no licence {licence_id} with prepaid terms")
        used = int(
            await conn.scalar(
                select(func.count()).where(
                    _CALLS.c.licensee_id == licence.licensee_id,
                    _CALLS.c.licence_id == licence_id,
                    _CALLS.c.pool == PREPAID_POOL,
                    billable(),
                )
            )
            or 0
        )
        state = await conn.scalar(select(_STATE.c.next_seq))
        top_ups = (
            await conn.execute(
                select(_TOP_UPS)
                .where(_TOP_UPS.c.licence_id == licence_id)
                .order_by(_TOP_UPS.c.first_position)
            )
        ).all()
    limit = int(licence.paid_prepaid_calls)
    lots = []
    left_e4 = 0
    for t in top_ups:
        drawn = min(max(used - int(t.first_position), 0), int(t.calls))
        left = int(t.calls) - drawn
        left_e4 += left * int(t.unit_price_e4)
        lots.append(
            {
                "id": t.id,
                "invoice_id": t.invoice_id,
                "bought_at": rfc3339(t.bought_at),
                "calls": int(t.calls),
                "first_position": int(t.first_position),
                "unit_price_fen": e4_to_fen(int(t.unit_price_e4)),
                "used_calls": drawn,
                "remaining_calls": left,
                "remaining_value_fen": e4_text(left * int(t.unit_price_e4)),
            }
        )
    bought = sum(lot["calls"] for lot in lots)
    return {
        "licence_id": licence_id,
        "licensee_id": licence.licensee_id,
        "as_of_seq": int(state) - 1 if state is not None else 0,
        "limit_calls": limit,
        "used_calls": used,
        "remaining_calls": max(limit - used, 0),
        "granted_calls": limit - bought,
        "bought_calls": bought,
        "bought_remaining_calls": sum(lot["remaining_calls"] for lot in lots),
        "bought_remaining_value_fen": fen_of_e4(left_e4),
        "top_ups": lots,
    }
