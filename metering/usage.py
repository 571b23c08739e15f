"""Usage: what each licence has used and has left, per dataset and period,
read from the quota counters (``GET /admin/v1/usage``, ``pdg usage``).

The free allowance is per licence, dataset and period. Paid terms are per
licence: a prepaid balance of calls (no period) or a monthly credit limit in
fen; each row also gives the paid calls made on its dataset in the period.
A prepaid balance has no period, so every period's row shows it as it stands
now; a credit limit is used up per period.
Money is in fen as a decimal string (four places at most), never a float.
"""

from __future__ import annotations

import asyncio
from typing import Literal

from pydantic import BaseModel
from redis.exceptions import RedisError

from core.money import e4_to_fen
from licensing.catalogue import Catalogue, DatasetView, LicenceView
from metering.periods import Period
from metering.quota import LicenceKeys, QuotaStoreError
from storage.redis import COMMAND_TIMEOUT, RedisClient


class FreeUsage(BaseModel):
    limit: int
    used: int
    remaining: int


class PaidUsage(BaseModel):
    terms: Literal["prepaid", "credit", "none"]
    #: Paid calls on this dataset in this period.
    calls: int
    #: prepaid: calls; credit: fen (decimal string); none: 0.
    limit: str
    used: str
    remaining: str
    unit: Literal["calls", "fen"]


class UsageRow(BaseModel):
    licence_id: str
    licensee_id: str
    dataset: str
    period: str
    free: FreeUsage
    paid: PaidUsage


def _covered(catalogue: Catalogue, licence: LicenceView) -> list[DatasetView]:
    return sorted((d for d in catalogue.datasets.values() if licence.covers(d)), key=lambda d: d.id)


async def _licence_rows(
    client: RedisClient, licence: LicenceView, datasets: list[DatasetView], period: Period
) -> list[UsageRow]:
    k = LicenceKeys(licence.id)
    keys = [k.prepaid() if licence.paid_prepaid_calls is not None else k.credit(period)]
    for dataset in datasets:
        keys += [k.free(dataset.id, period), k.paid_calls(dataset.id, period)]
    try:
        async with asyncio.timeout(COMMAND_TIMEOUT):
            values = [int(v or 0) for v in await client.mget(keys)]
    except (RedisError, OSError, ValueError, TimeoutError) as exc:
        raise QuotaStoreError(f"quota store unreachable: {type(exc).__name__}") from exc
    paid_used = values[0]
    rows = []
    for i, dataset in enumerate(datasets):
        free_used, paid_calls = values[1 + 2 * i], values[2 + 2 * i]
        free_limit = licence.free_allowance(dataset)
        if licence.paid_prepaid_calls is not None:
            limit = licence.paid_prepaid_calls
            paid = PaidUsage(
                terms="prepaid",
                calls=paid_calls,
                limit=str(limit),
                used=str(paid_used),
                remaining=str(max(0, limit - paid_used)),
                unit="calls",
            )
        elif licence.paid_credit_limit_fen is not None:
            limit_e4 = licence.paid_credit_limit_fen * 10000
            paid = PaidUsage(
                terms="credit",
                calls=paid_calls,
                limit=str(licence.paid_credit_limit_fen),
                used=e4_to_fen(paid_used),
                remaining=e4_to_fen(max(0, limit_e4 - paid_used)),
                unit="fen",
            )
        else:
            # No paid terms now; paid calls made earlier in the period still count.
            paid = PaidUsage(terms="none", calls=paid_calls, limit="0", used="0", remaining="0", unit="calls")
        rows.append(
            UsageRow(
                licence_id=licence.id,
                licensee_id=licence.licensee_id,
                dataset=dataset.id,
                period=period.name,
                free=FreeUsage(limit=free_limit, used=free_used, remaining=max(0, free_limit - free_used)),
                paid=paid,
            )
        )
    return rows


async def usage_report(
    client: RedisClient,
    catalogue: Catalogue,
    period: Period,
    *,
    licence_id: str | None = None,
    dataset_id: str | None = None,
    licensee_id: str | None = None,
) -> list[UsageRow]:
    """Rows for every licence (or the one named) and every dataset it covers
    (or the one named), optionally only one licensee's."""
    licences = sorted(catalogue.licences.values(), key=lambda lic: lic.id)
    rows: list[UsageRow] = []
    for licence in licences:
        if licence_id is not None and licence.id != licence_id:
            continue
        if licensee_id is not None and licence.licensee_id != licensee_id:
            continue
        datasets = [d for d in _covered(catalogue, licence) if dataset_id is None or d.id == dataset_id]
        if datasets:
            rows += await _licence_rows(client, licence, datasets, period)
    return rows
