"""The service layer of the catalogue and of licensing: datasets, licensees,
licences, apps. The admin API and the ``pdg`` command groups both call it.

Every change bumps the catalogue version in the same transaction, so every
replica's in-memory view notices it (``licensing.catalogue``). Each method is
one transaction: it is written whole or not at all.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker

from core.errors import ConflictError, NotFoundError, ValidationFailedError
from core.money import e4_to_fen, fen_to_e4
from ledger import admin_log
from licensing import schemas
from licensing.catalogue import current_version
from licensing.ids import new_id
from licensing.models import (
    AppRow,
    CatalogueVersionRow,
    DatasetRow,
    DatasetTermsRow,
    LicenceRow,
    LicenseeRow,
    PrepaidTopUpRow,
)
from licensing.secrets import hash_secret_async, new_secret
from storage.db import utcnow

OnChange = Callable[[], Awaitable[Any]]
#: Called after a change of terms is committed, with the catalogue version
#: that holds it; returns once every replica prices calls by it.
OnTermsChange = Callable[[int], Awaitable[Any]]
#: Bills a top-up in the transaction that makes it: issues its invoice and
#: answers the invoice's id (``billing.prepaid.invoicer``).
TopUpInvoicer = Callable[[AsyncConnection, PrepaidTopUpRow], Awaitable[str]]
_TOP_UP_ATTEMPTS = 5

#: Every stored id has this shape (``schemas.Identifier`` or ``ids.new_id``);
#: anything else (NUL, 10 kB, ...) is answered "not found" without asking a
#: database that may not even accept it as a parameter.
_PLAUSIBLE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _plausible(value: str | None) -> bool:
    return value is None or _PLAUSIBLE_ID.fullmatch(value) is not None


def _require(value: str, what: str) -> None:
    if not _plausible(value):
        raise NotFoundError(f"no {what} {value[:64]!r}")


async def _check_grants(session: AsyncSession, grants: list[str]) -> None:
    """Every dataset a licence names exists, and every ``provider/*`` names a
    provider of at least one dataset: a grant of nothing is a mistake."""
    ids = {g for g in grants if not g.endswith("/*")}
    providers = {g[:-2] for g in grants if g.endswith("/*")}
    if ids:
        found = set((await session.execute(select(DatasetRow.id).where(DatasetRow.id.in_(ids)))).scalars())
        if ids - found:
            raise ValidationFailedError("datasets", f"no dataset {sorted(ids - found)[0]}")
    if providers:
        query = select(DatasetRow.provider).where(DatasetRow.provider.in_(providers)).distinct()
        found = set((await session.execute(query)).scalars())
        if providers - found:
            raise ValidationFailedError("datasets", f"no dataset of provider {sorted(providers - found)[0]}")


async def _bump(session: AsyncSession) -> None:
    await session.execute(update(CatalogueVersionRow).values(version=CatalogueVersionRow.version + 1))


def _unit_price(paid: schemas.Paid | None) -> int | None:
    if paid is None or paid.prepaid_unit_price_fen is None:
        return None
    return fen_to_e4(paid.prepaid_unit_price_fen)


async def _keep_bought(session: AsyncSession, row: LicenceRow, paid: schemas.Paid | None) -> None:
    """Calls bought stay in the balance: new paid terms must keep a prepaid
    limit at least up to the last call a top-up bought."""
    bought = await session.scalar(
        select(func.max(PrepaidTopUpRow.first_position + PrepaidTopUpRow.calls)).where(
            PrepaidTopUpRow.licence_id == row.id
        )
    )
    if bought is None:
        return
    limit = paid.prepaid_calls if paid is not None else None
    if limit is None or limit < bought:
        raise ConflictError(
            f"licence {row.id} holds {bought} prepaid calls up to its last top-up: calls bought are never "
            "taken back (a credit note refunds them)"
        )


# -- row <-> resource ---------------------------------------------------------


def _price(row: DatasetRow | DatasetTermsRow) -> schemas.Price:
    return schemas.Price(
        per_call_fen=e4_to_fen(row.per_call_e4),
        per_record_fen=e4_to_fen(row.per_record_e4),
        tiers=[schemas.Tier(up_to=t["up_to"], per_call_fen=e4_to_fen(t["per_call_e4"])) for t in row.tiers],
    )


def _revenue_split(row: DatasetRow | DatasetTermsRow) -> schemas.RevenueSplit:
    return schemas.RevenueSplit(
        provider=e4_to_fen(row.split_provider),
        operator=e4_to_fen(row.split_operator),
        public_fund=e4_to_fen(row.split_public_fund),
    )


def dataset_out(row: DatasetRow) -> schemas.Dataset:
    return schemas.Dataset(
        id=row.id,
        name=row.name,
        provider=row.provider,
        upstream_url=row.upstream_url,
        classification=row.classification,
        open_class=row.open_class,
        free_monthly_calls=row.free_monthly_calls,
        price=_price(row),
        revenue_split=_revenue_split(row),
        burst=schemas.Burst(per_second=row.burst_per_second, capacity=row.burst_capacity),
        timeout_seconds=row.timeout_seconds,
        idle_timeout_seconds=row.idle_timeout_seconds,
        description=row.description,
        tax_code=row.tax_code,
        vat_rate=row.vat_rate,
        methods=list(row.methods),
        paths=list(row.paths),
        max_response_bytes=row.max_response_bytes,
        max_records_per_call=row.max_records_per_call,
        upstream_pool=None
        if row.upstream_pool is None
        else schemas.UpstreamPool.model_validate(row.upstream_pool),
        upstream_tls=None
        if row.upstream_tls is None
        else schemas.UpstreamTls.model_validate(row.upstream_tls),
        terms_version=row.terms_version,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _terms_of(row: DatasetRow) -> tuple[Any, ...]:
    """What a version of the terms holds."""
    return (
        row.per_call_e4,
        row.per_record_e4,
        [{"up_to": t["up_to"], "per_call_e4": int(t["per_call_e4"])} for t in row.tiers],
        row.split_provider,
        row.split_operator,
        row.split_public_fund,
    )


def _terms_row(row: DatasetRow, effective_from: datetime) -> DatasetTermsRow:
    per_call, per_record, tiers, provider, operator, fund = _terms_of(row)
    return DatasetTermsRow(
        dataset_id=row.id,
        version=row.terms_version,
        effective_from=effective_from,
        per_call_e4=per_call,
        per_record_e4=per_record,
        tiers=tiers,
        split_provider=provider,
        split_operator=operator,
        split_public_fund=fund,
    )


def terms_out(row: DatasetTermsRow) -> schemas.Terms:
    return schemas.Terms(
        dataset_id=row.dataset_id,
        version=row.version,
        effective_from=row.effective_from.astimezone(UTC),
        price=_price(row),
        revenue_split=_revenue_split(row),
    )


def _apply_dataset(row: DatasetRow, data: schemas.DatasetIn | schemas.DatasetPatch) -> None:
    fields = data.model_fields_set if isinstance(data, schemas.DatasetPatch) else set(type(data).model_fields)
    for name in ("name", "provider", "classification", "open_class", "free_monthly_calls", "description"):
        if name in fields and getattr(data, name) is not None:
            setattr(row, name, getattr(data, name))
    for name in (
        "timeout_seconds",
        "idle_timeout_seconds",
        "max_response_bytes",
        "max_records_per_call",
        "tax_code",
        "vat_rate",
    ):
        if name in fields:
            setattr(row, name, getattr(data, name))
    for name in ("methods", "paths"):
        if name in fields and getattr(data, name) is not None:
            setattr(row, name, list(getattr(data, name)))
    if "upstream_pool" in fields:
        pool = data.upstream_pool
        row.upstream_pool = None if pool is None else pool.model_dump(mode="json")
        if pool is not None:
            row.upstream_url = str(pool.targets[0].url).rstrip("/")
    if "upstream_tls" in fields:
        tls = data.upstream_tls
        row.upstream_tls = None if tls is None else tls.model_dump(mode="json")
    if "upstream_url" in fields and data.upstream_url is not None:
        url = str(data.upstream_url).rstrip("/")
        if row.upstream_pool is not None and url != row.upstream_url:
            raise ValidationFailedError("upstream_url", schemas.POOL_FIRST)
        row.upstream_url = url
    if "price" in fields and data.price is not None:
        row.per_call_e4 = fen_to_e4(data.price.per_call_fen)
        row.per_record_e4 = fen_to_e4(data.price.per_record_fen)
        row.tiers = [{"up_to": t.up_to, "per_call_e4": fen_to_e4(t.per_call_fen)} for t in data.price.tiers]
    if "revenue_split" in fields and data.revenue_split is not None:
        row.split_provider, row.split_operator, row.split_public_fund = data.revenue_split.basis_points()
    if "burst" in fields and data.burst is not None:
        row.burst_per_second, row.burst_capacity = data.burst.per_second, data.burst.capacity
    if row.per_record_e4 > 0 and row.max_records_per_call is None:
        raise ValidationFailedError("max_records_per_call", schemas.RECORDS_UNBOUNDED)


def licensee_out(row: LicenseeRow) -> schemas.Licensee:
    return schemas.Licensee(
        id=row.id,
        name=row.name,
        credit_code=row.credit_code,
        contact=row.contact,
        address=row.address,
        bank=row.bank,
        account=row.account,
        created_at=row.created_at,
    )


def licence_out(row: LicenceRow, now: datetime | None = None) -> schemas.Licence:
    now = now or utcnow()
    status = row.status
    if status == "active" and now >= row.valid_until:  # both aware: any zone compares
        status = "expired"
    paid = None
    if row.paid_credit_limit_fen is not None or row.paid_prepaid_calls is not None:
        price = row.paid_prepaid_unit_price_e4
        paid = schemas.Paid(
            credit_limit_fen=row.paid_credit_limit_fen,
            prepaid_calls=row.paid_prepaid_calls,
            prepaid_unit_price_fen=None if price is None else e4_to_fen(price),
        )
    return schemas.Licence.model_construct(
        id=row.id,
        licensee_id=row.licensee_id,
        datasets=list(row.datasets),
        max_classification=row.max_classification,
        purposes=list(row.purposes),  # type: ignore[arg-type]
        valid_from=row.valid_from.astimezone(UTC),
        valid_until=row.valid_until.astimezone(UTC),
        security_officer=row.security_officer,
        conditions=row.conditions,
        free_monthly_calls=row.free_monthly_calls,
        paid=paid,
        methods=row.methods,  # type: ignore[arg-type]
        paths=row.paths,
        status=status,  # type: ignore[arg-type]
        stored_status=row.status,  # type: ignore[arg-type]
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def top_up_out(row: PrepaidTopUpRow) -> schemas.TopUp:
    return schemas.TopUp(
        id=row.id,
        licence_id=row.licence_id,
        licensee_id=row.licensee_id,
        calls=row.calls,
        first_position=row.first_position,
        unit_price_fen=e4_to_fen(row.unit_price_e4),
        invoice_id=row.invoice_id,
        bought_at=row.bought_at.astimezone(UTC),
    )


def app_out(row: AppRow, client_secret: str | None = None) -> schemas.App:
    return schemas.App(
        id=row.id,
        client_id=row.id,
        licensee_id=row.licensee_id,
        name=row.name,
        auth_method=row.auth_method,
        enabled=row.enabled,
        created_at=row.created_at,
        client_secret=client_secret,
        previous_secret_until=row.previous_secret_until,
    )


# -- the service ----------------------------------------------------------------


class Registry:
    """Catalogue and licensing operations, each one transaction."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        on_change: OnChange | None = None,
        on_terms_change: OnTermsChange | None = None,
    ) -> None:
        self._sessions = sessions
        self._on_change = on_change
        self._on_terms_change = on_terms_change

    async def _changed(self) -> None:
        if self._on_change is not None:
            await self._on_change()

    async def _commit(
        self,
        session: AsyncSession,
        what: str,
        *,
        action: str,
        target: str,
        before: Any = None,
        after: Callable[[], Any] | None = None,
    ) -> None:
        """Commit the change with its admin-log entry (``ledger.admin_log``):
        ``before`` as it was, ``after()`` read once the change is flushed."""
        try:
            await _bump(session)
            await session.flush()
            await admin_log.record(
                await session.connection(),
                action,
                target,
                before=before,
                after=after() if after is not None else None,
            )
            await session.commit()
        except IntegrityError as exc:
            await session.rollback()
            raise ConflictError(f"{what} conflicts with an existing one") from exc

    # datasets
    async def create_dataset(self, data: schemas.DatasetIn) -> schemas.Dataset:
        async with self._sessions() as session:
            if await session.get(DatasetRow, data.id) is not None:
                raise ConflictError(f"dataset {data.id} already exists")
            row = DatasetRow(id=data.id, tiers=[], terms_version=1)
            _apply_dataset(row, data)
            row.created_at = row.updated_at = now = utcnow()
            session.add(row)
            session.add(_terms_row(row, now))
            await self._commit(
                session,
                f"dataset {data.id}",
                action="dataset.create",
                target=data.id,
                after=lambda: dump(dataset_out(row)),
            )
        await self._changed()
        return dataset_out(row)

    async def update_dataset(self, dataset_id: str, patch: schemas.DatasetPatch) -> schemas.Dataset:
        _require(dataset_id, "dataset")
        async with self._sessions() as session:
            row = await session.get(DatasetRow, dataset_id)
            if row is None:
                raise NotFoundError(f"no dataset {dataset_id}")
            was = dump(dataset_out(row))
            before = _terms_of(row)
            _apply_dataset(row, patch)
            new_terms = _terms_of(row) != before
            if new_terms:
                # A new version, in force from the next call on.
                row.terms_version += 1
                session.add(_terms_row(row, utcnow()))
            await self._commit(
                session,
                f"dataset {dataset_id}",
                action="dataset.update",
                target=dataset_id,
                before=was,
                after=lambda: dump(dataset_out(row)),
            )
            version = await current_version(session) if new_terms else None
        await self._changed()
        if version is not None and self._on_terms_change is not None:
            await self._on_terms_change(version)
        return dataset_out(row)

    async def list_terms(self, dataset_id: str) -> list[schemas.Terms]:
        """Every version of a dataset's terms, the first first."""
        _require(dataset_id, "dataset")
        async with self._sessions() as session:
            if await session.get(DatasetRow, dataset_id) is None:
                raise NotFoundError(f"no dataset {dataset_id}")
            rows = (
                await session.execute(
                    select(DatasetTermsRow)
                    .where(DatasetTermsRow.dataset_id == dataset_id)
                    .order_by(DatasetTermsRow.version)
                )
            ).scalars()
            return [terms_out(r) for r in rows]

    async def get_dataset(self, dataset_id: str) -> schemas.Dataset:
        _require(dataset_id, "dataset")
        async with self._sessions() as session:
            row = await session.get(DatasetRow, dataset_id)
        if row is None:
            raise NotFoundError(f"no dataset {dataset_id}")
        return dataset_out(row)

    async def list_datasets(self) -> list[schemas.Dataset]:
        async with self._sessions() as session:
            rows = (await session.execute(select(DatasetRow).order_by(DatasetRow.id))).scalars().all()
        return [dataset_out(r) for r in rows]

    # licensees
    async def create_licensee(self, data: schemas.LicenseeIn) -> schemas.Licensee:
        async with self._sessions() as session:
            existing = await session.execute(
                select(LicenseeRow.id).where(LicenseeRow.credit_code == data.credit_code)
            )
            if existing.first() is not None:
                raise ConflictError(f"a licensee with credit code {data.credit_code} already exists")
            row = LicenseeRow(
                id=data.id or new_id("licensee"),
                name=data.name,
                credit_code=data.credit_code,
                contact=data.contact,
                address=data.address,
                bank=data.bank,
                account=data.account,
            )
            if await session.get(LicenseeRow, row.id) is not None:
                raise ConflictError(f"licensee {row.id} already exists")
            session.add(row)
            await self._commit(
                session,
                f"licensee {row.id}",
                action="licensee.create",
                target=row.id,
                after=lambda: dump(licensee_out(row)),
            )
        return licensee_out(row)

    async def get_licensee(self, licensee_id: str) -> schemas.Licensee:
        _require(licensee_id, "licensee")
        async with self._sessions() as session:
            row = await session.get(LicenseeRow, licensee_id)
        if row is None:
            raise NotFoundError(f"no licensee {licensee_id}")
        return licensee_out(row)

    async def list_licensees(self, licensee_id: str | None = None) -> list[schemas.Licensee]:
        if not _plausible(licensee_id):
            return []
        query = select(LicenseeRow).order_by(LicenseeRow.id)
        if licensee_id is not None:
            query = query.where(LicenseeRow.id == licensee_id)
        async with self._sessions() as session:
            rows = (await session.execute(query)).scalars().all()
        return [licensee_out(r) for r in rows]

    # licences
    async def create_licence(self, data: schemas.LicenceIn) -> schemas.Licence:
        async with self._sessions() as session:
            if await session.get(LicenseeRow, data.licensee_id) is None:
                raise ValidationFailedError("licensee_id", f"no licensee {data.licensee_id}")
            await _check_grants(session, data.datasets)
            row = LicenceRow(
                id=data.id or new_id("licence"),
                licensee_id=data.licensee_id,
                datasets=list(dict.fromkeys(data.datasets)),
                max_classification=data.max_classification,
                purposes=list(data.purposes),
                valid_from=data.valid_from,
                valid_until=data.valid_until,
                status="active",
                security_officer=data.security_officer,
                conditions=data.conditions,
                free_monthly_calls=data.free_monthly_calls,
                paid_credit_limit_fen=data.paid.credit_limit_fen if data.paid else None,
                paid_prepaid_calls=data.paid.prepaid_calls if data.paid else None,
                paid_prepaid_unit_price_e4=_unit_price(data.paid),
                methods=data.methods,
                paths=data.paths,
            )
            if await session.get(LicenceRow, row.id) is not None:
                raise ConflictError(f"licence {row.id} already exists")
            session.add(row)
            await self._commit(
                session,
                f"licence {row.id}",
                action="licence.issue",
                target=row.id,
                after=lambda: dump(licence_out(row)),
            )
        await self._changed()
        return licence_out(row)

    async def get_licence(self, licence_id: str) -> schemas.Licence:
        _require(licence_id, "licence")
        async with self._sessions() as session:
            row = await session.get(LicenceRow, licence_id)
        if row is None:
            raise NotFoundError(f"no licence {licence_id}")
        return licence_out(row)

    async def list_licences(self, licensee_id: str | None = None) -> list[schemas.Licence]:
        if not _plausible(licensee_id):
            return []
        query = select(LicenceRow).order_by(LicenceRow.id)
        if licensee_id is not None:
            query = query.where(LicenceRow.licensee_id == licensee_id)
        async with self._sessions() as session:
            rows = (await session.execute(query)).scalars().all()
        return [licence_out(r) for r in rows]

    async def update_licence(self, licence_id: str, patch: schemas.LicencePatch) -> schemas.Licence:
        """Change a licence's grant or terms (a top-up raises ``paid``); a
        revoked licence is final and changes no more."""
        _require(licence_id, "licence")
        fields = patch.model_fields_set
        async with self._sessions() as session:
            row = await session.get(LicenceRow, licence_id)
            if row is None:
                raise NotFoundError(f"no licence {licence_id}")
            if row.status == "revoked":
                raise ConflictError(f"licence {licence_id} is revoked; it changes no more")
            was = dump(licence_out(row))
            if patch.datasets is not None:
                await _check_grants(session, patch.datasets)
            valid_until = patch.valid_until if "valid_until" in fields else None
            if valid_until is not None and valid_until <= row.valid_from:
                raise ValidationFailedError("valid_until", "valid_until must be after valid_from")
            for name in (
                "max_classification",
                "security_officer",
                "conditions",
                "free_monthly_calls",
                "methods",
                "paths",
            ):
                if name in fields:
                    setattr(row, name, getattr(patch, name))
            if patch.datasets is not None:
                row.datasets = list(dict.fromkeys(patch.datasets))
            if patch.purposes is not None:
                row.purposes = list(patch.purposes)
            if valid_until is not None:
                row.valid_until = valid_until
            if "paid" in fields:
                await _keep_bought(session, row, patch.paid)
                row.paid_credit_limit_fen = patch.paid.credit_limit_fen if patch.paid else None
                row.paid_prepaid_calls = patch.paid.prepaid_calls if patch.paid else None
                kept = patch.paid is not None and "prepaid_unit_price_fen" not in patch.paid.model_fields_set
                price = row.paid_prepaid_unit_price_e4 if kept else _unit_price(patch.paid)
                row.paid_prepaid_unit_price_e4 = price if row.paid_prepaid_calls is not None else None
            await self._commit(
                session,
                f"licence {licence_id}",
                action="licence.update",
                target=licence_id,
                before=was,
                after=lambda: dump(licence_out(row)),
            )
        await self._changed()
        return licence_out(row)

    async def top_up(
        self,
        licence_id: str,
        data: schemas.TopUpIn,
        *,
        bought_by: str,
        now: datetime,
        invoice: TopUpInvoicer,
    ) -> schemas.TopUp:
        """Buy ``data.calls`` prepaid calls for a licence with prepaid terms: its
        limit rises by them, and ``invoice(conn, top_up)`` bills them (issues
        the top-up's invoice, ``billing.prepaid``), in one transaction with
        the admin-log entry (``licence.top-up``). The licence's row is locked
        for it on PostgreSQL, and a licence's top-ups never overlap (unique
        ``first_position``): two at once take turns (on SQLite, whose
        readers do not lock, the second fails at that key and starts again
        on the first's limit)."""
        _require(licence_id, "licence")
        for attempt in range(_TOP_UP_ATTEMPTS):
            try:
                return await self._top_up(licence_id, data, bought_by=bought_by, now=now, invoice=invoice)
            except ConflictError as exc:
                if not isinstance(exc.__cause__, IntegrityError) or attempt == _TOP_UP_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    async def _top_up(
        self,
        licence_id: str,
        data: schemas.TopUpIn,
        *,
        bought_by: str,
        now: datetime,
        invoice: TopUpInvoicer,
    ) -> schemas.TopUp:
        async with self._sessions() as session:
            row = await session.get(LicenceRow, licence_id, with_for_update=True)
            if row is None:
                raise NotFoundError(f"no licence {licence_id}")
            if row.status == "revoked":
                raise ConflictError(f"licence {licence_id} is revoked; it changes no more")
            if row.paid_prepaid_calls is None:
                raise ConflictError(f"licence {licence_id} has no prepaid terms (paid.prepaid_calls)")
            if data.unit_price_fen is not None:
                price = fen_to_e4(data.unit_price_fen)
            elif row.paid_prepaid_unit_price_e4 is not None:
                price = row.paid_prepaid_unit_price_e4
            else:
                raise ValidationFailedError(
                    "unit_price_fen", f"licence {licence_id} has no agreed prepaid_unit_price_fen: give one"
                )
            was = dump(licence_out(row))
            first = row.paid_prepaid_calls
            row.paid_prepaid_calls = first + data.calls
            top_up = PrepaidTopUpRow(
                id=new_id("top-up"),
                licence_id=row.id,
                licensee_id=row.licensee_id,
                calls=data.calls,
                first_position=first,
                unit_price_e4=price,
                invoice_id="",
                bought_at=now,
                bought_by=bought_by,
            )
            await session.flush()
            top_up.invoice_id = await invoice(await session.connection(), top_up)
            session.add(top_up)
            await self._commit(
                session,
                f"a top-up of licence {licence_id}",
                action="licence.top-up",
                target=licence_id,
                before=was,
                after=lambda: {**dump(licence_out(row)), "top_up": dump(top_up_out(top_up))},
            )
        await self._changed()
        return top_up_out(top_up)

    async def list_top_ups(self, licence_id: str) -> list[schemas.TopUp]:
        _require(licence_id, "licence")
        async with self._sessions() as session:
            if await session.get(LicenceRow, licence_id) is None:
                raise NotFoundError(f"no licence {licence_id}")
            rows = (
                await session.execute(
                    select(PrepaidTopUpRow)
                    .where(PrepaidTopUpRow.licence_id == licence_id)
                    .order_by(PrepaidTopUpRow.first_position)
                )
            ).scalars()
            return [top_up_out(r) for r in rows]

    async def set_licence_status(self, licence_id: str, action: str) -> schemas.Licence:
        """``suspend`` (active -> suspended), ``resume`` (suspended -> active),
        ``revoke`` (any -> revoked, final)."""
        target = {"suspend": "suspended", "resume": "active", "revoke": "revoked"}[action]
        _require(licence_id, "licence")
        async with self._sessions() as session:
            row = await session.get(LicenceRow, licence_id)
            if row is None:
                raise NotFoundError(f"no licence {licence_id}")
            allowed = {
                "suspend": {"active", "suspended"},
                "resume": {"suspended", "active"},
                "revoke": {"active", "suspended", "revoked"},
            }[action]
            if row.status not in allowed:
                raise ConflictError(f"licence {licence_id} is {row.status}; it cannot be {target}")
            was = dump(licence_out(row))
            row.status = target
            await self._commit(
                session,
                f"licence {licence_id}",
                action=f"licence.{action}",
                target=licence_id,
                before=was,
                after=lambda: dump(licence_out(row)),
            )
        await self._changed()
        return licence_out(row)

    # apps
    async def create_app(self, data: schemas.AppIn) -> schemas.App:
        secret = None if data.jwks is not None else new_secret()
        secret_hash = await hash_secret_async(secret) if secret is not None else None
        async with self._sessions() as session:
            if await session.get(LicenseeRow, data.licensee_id) is None:
                raise ValidationFailedError("licensee_id", f"no licensee {data.licensee_id}")
            row = AppRow(
                id=data.id or new_id("app"),
                licensee_id=data.licensee_id,
                name=data.name,
                auth_method="private_key_jwt" if data.jwks is not None else "client_secret",
                secret_hash=secret_hash,
                jwks=data.jwks,
                enabled=True,
            )
            if await session.get(AppRow, row.id) is not None:
                raise ConflictError(f"app {row.id} already exists")
            session.add(row)
            await self._commit(
                session, f"app {row.id}", action="app.create", target=row.id, after=lambda: dump(app_out(row))
            )
        await self._changed()
        return app_out(row, client_secret=secret)

    async def get_app(self, app_id: str) -> schemas.App:
        _require(app_id, "app")
        async with self._sessions() as session:
            row = await session.get(AppRow, app_id)
        if row is None:
            raise NotFoundError(f"no app {app_id}")
        return app_out(row)

    async def list_apps(self, licensee_id: str | None = None) -> list[schemas.App]:
        if not _plausible(licensee_id):
            return []
        query = select(AppRow).order_by(AppRow.id)
        if licensee_id is not None:
            query = query.where(AppRow.licensee_id == licensee_id)
        async with self._sessions() as session:
            rows = (await session.execute(query)).scalars().all()
        return [app_out(r) for r in rows]

    async def rotate_app_secret(self, app_id: str, overlap_seconds: int) -> schemas.App:
        """A new client secret (returned once); the one before stays valid
        for ``overlap_seconds`` more, so clients can switch without a gap. A
        secret rotated out earlier is forgotten at once."""
        _require(app_id, "app")
        secret = new_secret()
        secret_hash = await hash_secret_async(secret)
        async with self._sessions() as session:
            row = await session.get(AppRow, app_id)
            if row is None:
                raise NotFoundError(f"no app {app_id}")
            if row.secret_hash is None:
                raise ConflictError(f"app {app_id} authenticates with private_key_jwt; it has no secret")
            was = dump(app_out(row))
            row.previous_secret_hash = row.secret_hash if overlap_seconds > 0 else None
            row.previous_secret_until = (
                utcnow() + timedelta(seconds=overlap_seconds) if overlap_seconds else None
            )
            row.secret_hash = secret_hash
            await self._commit(
                session,
                f"app {app_id}",
                action="app.rotate-secret",
                target=app_id,
                before=was,
                after=lambda: dump(app_out(row)),
            )
        await self._changed()
        return app_out(row, client_secret=secret)

    async def set_app_jwks(self, app_id: str, data: schemas.AppJwksIn) -> schemas.App:
        """Replace the public keys of an app that authenticates with
        ``private_key_jwt``; assertions signed with a key no longer in the set
        are refused once the licence view has the change. An app with a
        client secret takes no keys (ConflictError)."""
        _require(app_id, "app")
        async with self._sessions() as session:
            row = await session.get(AppRow, app_id)
            if row is None:
                raise NotFoundError(f"no app {app_id}")
            if row.auth_method != "private_key_jwt":
                raise ConflictError(f"app {app_id} authenticates with a client secret; it takes no keys")
            was = {"jwks": row.jwks}
            row.jwks = data.jwks
            await self._commit(
                session,
                f"app {app_id}",
                action="app.set-jwks",
                target=app_id,
                before=was,
                after=lambda: {"jwks": row.jwks},
            )
        await self._changed()
        return app_out(row)

    async def set_app_enabled(self, app_id: str, enabled: bool) -> schemas.App:
        _require(app_id, "app")
        async with self._sessions() as session:
            row = await session.get(AppRow, app_id)
            if row is None:
                raise NotFoundError(f"no app {app_id}")
            was = dump(app_out(row))
            row.enabled = enabled
            await self._commit(
                session,
                f"app {app_id}",
                action="app.enable" if enabled else "app.disable",
                target=app_id,
                before=was,
                after=lambda: dump(app_out(row)),
            )
        await self._changed()
        return app_out(row)


def dump(items: Sequence[BaseModel] | BaseModel) -> Any:
    """Resources as JSON-ready data."""
    if isinstance(items, BaseModel):
        return items.model_dump(mode="json")
    return [i.model_dump(mode="json") for i in items]
