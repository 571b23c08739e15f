"""``pdg dataset|licensee|licence|app|admin-token ...``: the command-line face
of the same service layer the admin API uses (``licensing.registry``), with
the same validation (``licensing.schemas``), so a field is checked the same
way whichever door it comes through. Every command takes ``--json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from config.settings import Settings
from core.errors import BadRequestError
from licensing import schemas

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from licensing.admin_tokens import AdminTokens
    from licensing.registry import Registry

# The database layer, Argon2 and rich are imported by the commands that use
# them, so that ``--help`` and bad input answer at once.

Common = Callable[[argparse.ArgumentParser], None]


@dataclass
class Services:
    registry: Registry
    admin_tokens: AdminTokens
    engine: AsyncEngine


@contextlib.asynccontextmanager
async def migrated_engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    """The deployment's database, migrated first when ``server.auto_migrate``."""
    from storage import migrate
    from storage.db import create_engine

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = create_engine(settings.database_url)
    try:
        if settings.server.auto_migrate:
            await migrate.upgrade(engine)
        yield engine
    finally:
        await engine.dispose()


@contextlib.asynccontextmanager
async def services(settings: Settings) -> AsyncIterator[Services]:
    from licensing.admin_tokens import AdminTokens
    from licensing.catalogue import max_view_age
    from licensing.registry import Registry
    from storage.db import session_factory

    async def terms_changed(version: int) -> None:
        # Replicas pick the change up from the database within their view's
        # longest life; the command returns after it, so the new terms apply
        # from the next call on, on every replica (CatalogueCache.barrier
        # waits less in a gateway, which hears the replicas through Redis).
        await asyncio.sleep(max_view_age(settings.server.catalogue_refresh_seconds))

    async with migrated_engine(settings) as engine:
        sessions = session_factory(engine)
        yield Services(Registry(sessions, on_terms_change=terms_changed), AdminTokens(sessions), engine)


@contextlib.contextmanager
def progress_bar(label: str) -> Iterator[Callable[[int, int], None] | None]:
    """A rich progress bar on stderr when it is a terminal; else nothing."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def command_group(
    sub: Any, name: str, help_text: str, common: Common
) -> Callable[[str, str, Any], argparse.ArgumentParser]:
    """A ``pdg NAME ACTION`` group; returns what adds one action to it (with the
    common options and ``--json``), running ``run``."""
    group = sub.add_parser(name, help=help_text)
    actions = group.add_subparsers(dest="action", metavar="ACTION", parser_class=type(group))
    actions.required = True

    def command(action: str, action_help: str, run: Any) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = actions.add_parser(
            action, help=action_help, description=action_help
        )
        common(parser)
        parser.add_argument("--json", action="store_true", help="machine-readable output")
        parser.set_defaults(run=run)
        return parser

    return command


def emit(args: argparse.Namespace, data: Any, text: str | None = None, columns: tuple[str, ...] = ()) -> None:
    """Print ``data`` as JSON (``--json``), a table (lists) or ``text``/fields."""
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps(data, ensure_ascii=False, indent=2) + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=True)
    if isinstance(data, list):
        table = Table(*columns)
        for item in data:
            table.add_row(*(_cell(item.get(c)) for c in columns))
        console.print(table)
    elif text is not None:
        console.print(text, markup=False, highlight=False)
    else:
        for key, value in data.items():
            console.print(f"{key}: {_cell(value)}", markup=False, highlight=False)


def dump(items: Sequence[BaseModel] | BaseModel) -> Any:
    """Resources as JSON-ready data (as ``licensing.registry.dump``)."""
    if isinstance(items, BaseModel):
        return items.model_dump(mode="json")
    return [i.model_dump(mode="json") for i in items]


def _cell(value: Any) -> str:
    if isinstance(value, list | dict):
        return json.dumps(value, ensure_ascii=False)
    return "" if value is None else str(value)


def _load_file(path: str) -> dict[str, Any]:
    try:
        with sys.stdin if path == "-" else open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise BadRequestError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from exc
    except UnicodeDecodeError as exc:
        raise BadRequestError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except RecursionError as exc:
        raise BadRequestError(f"{path}: JSON nested too deeply") from exc
    if not isinstance(data, dict):
        raise BadRequestError(f"{path}: a JSON object is required")
    return data


def _fields(args: argparse.Namespace, names: dict[str, str]) -> dict[str, Any]:
    """Take ``--file`` (if any), then overlay each flag that was given."""
    data = _load_file(args.file) if getattr(args, "file", None) else {}
    for attr, field in names.items():
        value = getattr(args, attr, None)
        if value is not None and value != []:
            data[field] = value
    return data


# -- datasets -----------------------------------------------------------------

DATASET_COLUMNS = (
    "id",
    "name",
    "provider",
    "classification",
    "open_class",
    "free_monthly_calls",
    "terms_version",
    "upstream_url",
)


def _operation_flags(p: argparse.ArgumentParser, what: str, *, granted: bool = False) -> None:
    p.add_argument(
        "--method", action="append", default=[], type=str.upper, help=f"an HTTP method {what} repeatable"
    )
    example = "DATASET/stations/*" if granted else "stations/*"
    p.add_argument(
        "--path",
        action="append",
        default=[],
        help=f"a path pattern {what} repeatable: e.g. {example} ('*' one segment, a last '**' any rest)",
    )


def _split(value: str) -> dict[str, str]:
    parts = value.split(",")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError("give PROVIDER,OPERATOR,PUBLIC_FUND, e.g. 0.5,0.3,0.2")
    return dict(zip(("provider", "operator", "public_fund"), (p.strip() for p in parts), strict=True))


def _tier(value: str) -> dict[str, Any]:
    up_to, sep, price = value.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(
            "give UP_TO:PER_CALL_FEN, e.g. 10000:2.5, or :1.5 for no upper bound"
        )
    try:
        bound = None if up_to in ("-", "") else int(up_to)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"tier bound {up_to!r} is not a whole number") from exc
    return {"up_to": bound, "per_call_fen": price}


def _dataset_payload(args: argparse.Namespace) -> dict[str, Any]:
    data = _fields(
        args,
        {
            "id": "id",
            "name": "name",
            "provider": "provider",
            "upstream_url": "upstream_url",
            "classification": "classification",
            "open_class": "open_class",
            "free_monthly_calls": "free_monthly_calls",
            "split": "revenue_split",
            "timeout": "timeout_seconds",
            "idle_timeout": "idle_timeout_seconds",
            "description": "description",
            "method": "methods",
            "path": "paths",
            "max_response_bytes": "max_response_bytes",
            "max_records_per_call": "max_records_per_call",
            "tax_code": "tax_code",
            "vat_rate": "vat_rate",
        },
    )
    price = dict(data.get("price") or {})
    for attr, field in (
        ("per_call_fen", "per_call_fen"),
        ("per_record_fen", "per_record_fen"),
        ("tier", "tiers"),
    ):
        if getattr(args, attr, None):
            price[field] = getattr(args, attr)
    if price:
        data["price"] = price
    burst = dict(data.get("burst") or {})
    if args.burst_per_second is not None:
        burst["per_second"] = args.burst_per_second
    if args.burst_capacity is not None:
        burst["capacity"] = args.burst_capacity
    if burst:
        data["burst"] = burst
    return data


async def dataset_create(args: argparse.Namespace, settings: Settings) -> int:
    data = schemas.parse(schemas.DatasetIn, _dataset_payload(args))
    async with services(settings) as s:
        created = await s.registry.create_dataset(data)
    emit(args, dump(created), f"dataset {created.id} created")
    return 0


async def dataset_update(args: argparse.Namespace, settings: Settings) -> int:
    payload = _dataset_payload(args)
    payload.pop("id", None)
    patch = schemas.parse(schemas.DatasetPatch, payload)
    async with services(settings) as s:
        updated = await s.registry.update_dataset(args.dataset_id, patch)
    emit(args, dump(updated), f"dataset {updated.id} updated")
    return 0


async def dataset_list(args: argparse.Namespace, settings: Settings) -> int:
    async with services(settings) as s:
        emit(args, dump(await s.registry.list_datasets()), columns=DATASET_COLUMNS)
    return 0


async def dataset_show(args: argparse.Namespace, settings: Settings) -> int:
    async with services(settings) as s:
        emit(args, dump(await s.registry.get_dataset(args.dataset_id)))
    return 0


async def dataset_terms(args: argparse.Namespace, settings: Settings) -> int:
    async with services(settings) as s:
        versions = dump(await s.registry.list_terms(args.dataset_id))
    rows = [
        {
            "version": t["version"],
            "effective_from": t["effective_from"],
            "per_call_fen": t["price"]["per_call_fen"],
            "per_record_fen": t["price"]["per_record_fen"],
            "tiers": ", ".join(f"{x['up_to'] or '-'}:{x['per_call_fen']}" for x in t["price"]["tiers"]),
            "split": "/".join(t["revenue_split"][k] for k in ("provider", "operator", "public_fund")),
        }
        for t in versions
    ]
    if getattr(args, "json", False):
        emit(args, versions)
    else:
        emit(args, rows, columns=tuple(rows[0]) if rows else ("version",))
    return 0


# -- licensees ----------------------------------------------------------------


async def licensee_create(args: argparse.Namespace, settings: Settings) -> int:
    data = schemas.parse(
        schemas.LicenseeIn,
        _fields(
            args,
            {
                "id": "id",
                "name": "name",
                "credit_code": "credit_code",
                "contact": "contact",
                "address": "address",
                "bank": "bank",
                "account": "account",
            },
        ),
    )
    async with services(settings) as s:
        created = await s.registry.create_licensee(data)
    emit(args, dump(created), f"licensee {created.id} created")
    return 0


async def licensee_list(args: argparse.Namespace, settings: Settings) -> int:
    async with services(settings) as s:
        emit(args, dump(await s.registry.list_licensees()), columns=("id", "name", "credit_code", "contact"))
    return 0


async def licensee_show(args: argparse.Namespace, settings: Settings) -> int:
    async with services(settings) as s:
        emit(args, dump(await s.registry.get_licensee(args.licensee_id)))
    return 0


# -- licences -----------------------------------------------------------------


async def licence_create(args: argparse.Namespace, settings: Settings) -> int:
    data = _fields(
        args,
        {
            "id": "id",
            "licensee": "licensee_id",
            "dataset": "datasets",
            "max_classification": "max_classification",
            "purpose": "purposes",
            "valid_from": "valid_from",
            "valid_until": "valid_until",
            "security_officer": "security_officer",
            "conditions": "conditions",
            "free_monthly_calls": "free_monthly_calls",
            "method": "methods",
            "path": "paths",
        },
    )
    if args.prepaid_calls is not None:
        data["paid"] = {"prepaid_calls": args.prepaid_calls}
    if args.prepaid_unit_price_fen is not None:
        data["paid"] = {**data.get("paid", {}), "prepaid_unit_price_fen": args.prepaid_unit_price_fen}
    if args.credit_limit_fen is not None:
        data["paid"] = {**data.get("paid", {}), "credit_limit_fen": args.credit_limit_fen}
    licence = schemas.parse(schemas.LicenceIn, data)
    async with services(settings) as s:
        created = await s.registry.create_licence(licence)
    emit(args, dump(created), f"licence {created.id} issued")
    return 0


async def licence_update(args: argparse.Namespace, settings: Settings) -> int:
    data = _fields(
        args,
        {
            "dataset": "datasets",
            "max_classification": "max_classification",
            "purpose": "purposes",
            "valid_until": "valid_until",
            "security_officer": "security_officer",
            "conditions": "conditions",
            "free_monthly_calls": "free_monthly_calls",
            "method": "methods",
            "path": "paths",
        },
    )
    paid = (
        ("prepaid_calls", args.prepaid_calls),
        ("prepaid_unit_price_fen", args.prepaid_unit_price_fen),
        ("credit_limit_fen", args.credit_limit_fen),
    )
    if any(v is not None for _, v in paid):
        data["paid"] = {k: v for k, v in paid if v is not None}
    if not data:
        raise BadRequestError("nothing to change: give at least one field")
    patch = schemas.parse(schemas.LicencePatch, data)
    async with services(settings) as s:
        updated = await s.registry.update_licence(args.licence_id, patch)
    emit(args, dump(updated), f"licence {updated.id} updated")
    return 0


async def usage(args: argparse.Namespace, settings: Settings) -> int:
    from licensing.catalogue import load_catalogue
    from metering.periods import PeriodError, parse_period, period_of, zone
    from metering.quota import QuotaStoreError
    from metering.usage import usage_report
    from storage.db import create_engine, session_factory, utcnow
    from storage.redis import deployment_redis

    tz = zone(settings.billing.time_zone)
    try:
        period = parse_period(args.period, tz) if args.period else period_of(utcnow(), tz)
    except PeriodError as exc:
        raise BadRequestError(str(exc)) from exc
    engine = create_engine(settings.database_url)
    try:
        catalogue = await load_catalogue(session_factory(engine))
    finally:
        await engine.dispose()
    async with deployment_redis(settings) as client:
        try:
            rows = await usage_report(
                client,
                catalogue,
                period,
                licence_id=args.licence,
                dataset_id=args.dataset,
                licensee_id=args.licensee,
            )
        except QuotaStoreError as exc:
            raise BadRequestError(f"the quota store cannot be reached: {exc}") from exc
    data = [row.model_dump(mode="json") for row in rows]
    if getattr(args, "json", False):
        emit(args, data)
        return 0
    flat = [
        {
            "licence": r["licence_id"],
            "dataset": r["dataset"],
            "period": r["period"],
            "free used/limit": f"{r['free']['used']}/{r['free']['limit']}",
            "paid calls": r["paid"]["calls"],
            "paid used/limit": f"{r['paid']['used']}/{r['paid']['limit']} {r['paid']['unit']}"
            if r["paid"]["terms"] != "none"
            else "no paid terms",
        }
        for r in data
    ]
    emit(
        args,
        flat,
        columns=("licence", "dataset", "period", "free used/limit", "paid calls", "paid used/limit"),
    )
    return 0


async def licence_list(args: argparse.Namespace, settings: Settings) -> int:
    async with services(settings) as s:
        emit(
            args,
            dump(await s.registry.list_licences(args.licensee)),
            columns=(
                "id",
                "licensee_id",
                "status",
                "datasets",
                "purposes",
                "max_classification",
                "valid_until",
            ),
        )
    return 0


async def licence_show(args: argparse.Namespace, settings: Settings) -> int:
    async with services(settings) as s:
        emit(args, dump(await s.registry.get_licence(args.licence_id)))
    return 0


async def licence_top_up(args: argparse.Namespace, settings: Settings) -> int:
    from billing.prepaid import invoicer
    from storage.db import utcnow

    data = {"calls": args.calls}
    if args.unit_price_fen is not None:
        data["unit_price_fen"] = args.unit_price_fen
    top_up_in = schemas.parse(schemas.TopUpIn, data)
    now = utcnow()
    async with services(settings) as s:
        top_up = await s.registry.top_up(
            args.licence_id, top_up_in, bought_by="cli", now=now, invoice=invoicer(settings, now)
        )
    emit(
        args,
        dump(top_up),
        f"licence {top_up.licence_id}: {top_up.calls} prepaid calls bought at {top_up.unit_price_fen} fen "
        f"each, invoice {top_up.invoice_id}",
    )
    return 0


async def licence_prepaid(args: argparse.Namespace, settings: Settings) -> int:
    from billing.prepaid import balance

    async with services(settings) as s:
        found = await balance(s.engine, args.licence_id)
    lines = [
        f"licence {found['licence_id']}: {found['remaining_calls']} of {found['limit_calls']} prepaid calls "
        f"left ({found['used_calls']} used, as of record {found['as_of_seq']})",
        f"bought: {found['bought_calls']} calls, {found['bought_remaining_calls']} left, "
        f"worth {found['bought_remaining_value_fen']} fen; granted: {found['granted_calls']} calls",
    ]
    lines += [
        f"  {t['id']}  {t['bought_at']}  {t['calls']} at {t['unit_price_fen']} fen  used {t['used_calls']}  "
        f"left {t['remaining_calls']} ({t['remaining_value_fen']} fen)  {t['invoice_id']}"
        for t in found["top_ups"]
    ]
    emit(args, found, "\n".join(lines))
    return 0


def _licence_action(action: str) -> Callable[[argparse.Namespace, Settings], Any]:
    async def run(args: argparse.Namespace, settings: Settings) -> int:
        async with services(settings) as s:
            licence = await s.registry.set_licence_status(args.licence_id, action)
        emit(args, dump(licence), f"licence {licence.id} is {licence.status}")
        return 0

    return run


# -- apps -----------------------------------------------------------------------


async def app_create(args: argparse.Namespace, settings: Settings) -> int:
    data = _fields(args, {"id": "id", "licensee": "licensee_id", "name": "name"})
    if args.jwks:
        data["jwks"] = _load_file(args.jwks)
    app = schemas.parse(schemas.AppIn, data)
    async with services(settings) as s:
        created = await s.registry.create_app(app)
    text = f"app {created.id} registered"
    if created.client_secret:
        text += (
            f"\nclient_id:     {created.client_id}\nclient_secret: {created.client_secret}\n"
            "(the secret is shown once; it is stored only as a hash)"
        )
    emit(args, dump(created), text)
    return 0


async def app_list(args: argparse.Namespace, settings: Settings) -> int:
    async with services(settings) as s:
        emit(
            args,
            dump(await s.registry.list_apps(args.licensee)),
            columns=("id", "licensee_id", "name", "auth_method", "enabled"),
        )
    return 0


async def app_rotate_secret(args: argparse.Namespace, settings: Settings) -> int:
    data = schemas.parse(schemas.SecretRotationIn, _fields(args, {"overlap": "overlap_seconds"}))
    async with services(settings) as s:
        app = await s.registry.rotate_app_secret(args.app_id, data.overlap_seconds)
    until = app.previous_secret_until
    text = f"app {app.id}: new client_secret: {app.client_secret}\n(shown once; stored only as a hash) " + (
        f"the secret before is accepted until {until.isoformat()}"
        if until
        else "the secret before is refused"
    )
    emit(args, dump(app), text)
    return 0


def _app_switch(enabled: bool) -> Callable[[argparse.Namespace, Settings], Any]:
    async def run(args: argparse.Namespace, settings: Settings) -> int:
        async with services(settings) as s:
            app = await s.registry.set_app_enabled(args.app_id, enabled)
        emit(args, dump(app), f"app {app.id} {'enabled' if app.enabled else 'disabled'}")
        return 0

    return run


# -- admin tokens ---------------------------------------------------------------


async def admin_token_create(args: argparse.Namespace, settings: Settings) -> int:
    data = schemas.parse(
        schemas.AdminTokenIn,
        {
            "role": args.role,
            "licensee_id": args.licensee,
            "description": args.description or "",
            "expires_in_seconds": args.expires_in,
        },
    )
    async with services(settings) as s:
        created = await s.admin_tokens.create(data)
    emit(
        args,
        {"token": created.token, "id": created.id, "role": created.role, "licensee_id": created.licensee_id},
        created.token,
    )
    return 0


async def admin_token_list(args: argparse.Namespace, settings: Settings) -> int:
    async with services(settings) as s:
        rows = await s.admin_tokens.list()
    data = [
        {
            "id": r.id,
            "role": r.role,
            "licensee_id": r.licensee_id,
            "description": r.description,
            "created_at": r.created_at.isoformat(),
            "revoked_at": r.revoked_at.isoformat() if r.revoked_at else None,
            "expires_at": r.expires_at.isoformat() if r.expires_at else None,
        }
        for r in rows
    ]
    columns = ("id", "role", "licensee_id", "description", "created_at", "revoked_at", "expires_at")
    emit(args, data, columns=columns)
    return 0


async def admin_token_revoke(args: argparse.Namespace, settings: Settings) -> int:
    async with services(settings) as s:
        if not await s.admin_tokens.revoke(args.token_id):
            raise BadRequestError(f"no active admin token {args.token_id}")
    emit(args, {"id": args.token_id, "revoked": True}, f"admin token {args.token_id} revoked")
    return 0


# -- the parser -----------------------------------------------------------------


def add_commands(sub: Any, common: Common) -> None:
    def group(name: str, help_text: str) -> Any:
        parser = sub.add_parser(name, help=help_text)
        actions = parser.add_subparsers(dest="action", metavar="ACTION", parser_class=type(parser))
        actions.required = True
        return actions

    def command(actions: Any, name: str, help_text: str, run: Any, *ids: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = actions.add_parser(name, help=help_text)
        for ident in ids:
            parser.add_argument(ident)
        common(parser)
        parser.add_argument("--json", action="store_true", help="machine-readable output")
        parser.set_defaults(run=run)
        return parser

    datasets = group("dataset", "the dataset catalogue")
    for name, run in (("create", dataset_create), ("update", dataset_update)):
        p = command(datasets, name, f"{name} a dataset", run, *(("dataset_id",) if name == "update" else ()))
        p.add_argument(
            "--file", help="JSON file (or - for stdin) with the dataset's fields; flags override it"
        )
        if name == "create":
            p.add_argument("--id")
        p.add_argument("--name")
        p.add_argument("--provider", help="owning provider department")
        p.add_argument("--upstream-url")
        p.add_argument("--classification", type=int, help="1-4")
        p.add_argument("--open-class", choices=("open", "conditional", "closed"))
        p.add_argument("--free-monthly-calls", type=int)
        p.add_argument("--per-call-fen", help="decimal, up to 4 places")
        p.add_argument("--per-record-fen", help="decimal, up to 4 places")
        p.add_argument(
            "--tier",
            type=_tier,
            action="append",
            default=[],
            help="UP_TO:PER_CALL_FEN, repeatable, increasing; the last may be :PER_CALL_FEN (no bound)",
        )
        p.add_argument("--split", type=_split, help="revenue split PROVIDER,OPERATOR,PUBLIC_FUND")
        p.add_argument("--burst-per-second", type=float)
        p.add_argument("--burst-capacity", type=int)
        p.add_argument("--timeout", type=float, help="a call's whole time upstream, in seconds")
        p.add_argument("--idle-timeout", type=float, help="the longest silence of the upstream, in seconds")
        p.add_argument("--description")
        p.add_argument("--tax-code", help="its invoice lines' tax classification code (税收分类编码)")
        p.add_argument("--vat-rate", help="its invoice lines' VAT rate, e.g. 0.06 (else billing.vat_rate)")
        _operation_flags(p, "the dataset serves")
        p.add_argument("--max-response-bytes", type=int, help="largest response relayed")
        p.add_argument(
            "--max-records-per-call", type=int, help="most records a call may return (required if priced)"
        )
    command(datasets, "list", "list datasets", dataset_list)
    command(datasets, "show", "show a dataset", dataset_show, "dataset_id")
    command(
        datasets,
        "terms",
        "list the versions of a dataset's terms (prices, tiers, split)",
        dataset_terms,
        "dataset_id",
    )

    licensees = group("licensee", "licensed organisations")
    p = command(licensees, "create", "register a licensee", licensee_create)
    p.add_argument("--file")
    p.add_argument("--id")
    p.add_argument("--name")
    p.add_argument("--credit-code", help="18-character unified social credit code")
    p.add_argument("--contact")
    p.add_argument("--address", help="as invoices name the buyer")
    p.add_argument("--bank", help="the buyer's bank, as invoices name it")
    p.add_argument("--account", help="the buyer's bank account, as invoices name it")
    command(licensees, "list", "list licensees", licensee_list)
    command(licensees, "show", "show a licensee", licensee_show, "licensee_id")

    licences = group("licence", "operator licences")
    p = command(licences, "create", "issue a licence", licence_create)
    p.add_argument("--file")
    p.add_argument("--id")
    p.add_argument("--licensee", help="licensee id")
    p.add_argument("--dataset", action="append", default=[], help="dataset id or provider/*, repeatable")
    p.add_argument("--max-classification", type=int)
    p.add_argument("--purpose", action="append", default=[], choices=schemas.PURPOSES, help="repeatable")
    p.add_argument("--valid-from", help="RFC 3339 time")
    p.add_argument("--valid-until", help="RFC 3339 time")
    p.add_argument("--security-officer")
    p.add_argument("--conditions")
    p.add_argument("--free-monthly-calls", type=int, help="override the datasets' free allowance")
    p.add_argument("--prepaid-calls", type=int, help="prepaid calls granted (billed at list price when used)")
    p.add_argument("--prepaid-unit-price-fen", help="the agreed unit price of a prepaid call bought (top-up)")
    p.add_argument("--credit-limit-fen", type=int)
    _operation_flags(p, "the licence allows (narrowing its datasets'),", granted=True)
    p = command(licences, "update", "change a licence's grant or terms", licence_update, "licence_id")
    p.add_argument("--file")
    p.add_argument("--dataset", action="append", default=[], help="dataset id or provider/*, repeatable")
    p.add_argument("--max-classification", type=int)
    p.add_argument("--purpose", action="append", default=[], choices=schemas.PURPOSES, help="repeatable")
    p.add_argument("--valid-until", help="RFC 3339 time")
    p.add_argument("--security-officer")
    p.add_argument("--conditions")
    p.add_argument("--free-monthly-calls", type=int, help="override the datasets' free allowance")
    p.add_argument("--prepaid-calls", type=int, help="the new prepaid limit (calls above it are granted)")
    p.add_argument("--prepaid-unit-price-fen", help="the agreed unit price of a prepaid call bought")
    p.add_argument("--credit-limit-fen", type=int, help="the new monthly credit limit")
    _operation_flags(p, "the licence allows (narrowing its datasets'),", granted=True)
    p = command(licences, "list", "list licences", licence_list)
    p.add_argument("--licensee")
    command(licences, "show", "show a licence", licence_show, "licence_id")
    for action in ("suspend", "resume", "revoke"):
        command(licences, action, f"{action} a licence", _licence_action(action), "licence_id")
    p = command(
        licences,
        "top-up",
        "buy prepaid calls for a licence (invoiced at once)",
        licence_top_up,
        "licence_id",
    )
    p.add_argument("--calls", type=int, required=True, help="how many calls are bought")
    p.add_argument("--unit-price-fen", help="the price of each (default: the licence's agreed unit price)")
    command(
        licences, "prepaid", "a prepaid licence's balance in calls and money", licence_prepaid, "licence_id"
    )

    apps = group("app", "client applications")
    p = command(apps, "create", "register an app", app_create)
    p.add_argument("--file")
    p.add_argument("--id")
    p.add_argument("--licensee", help="licensee id")
    p.add_argument("--name")
    p.add_argument(
        "--jwks", help="JWKS file of public keys, for private_key_jwt (otherwise a secret is made)"
    )
    p = command(apps, "list", "list apps", app_list)
    p.add_argument("--licensee")
    command(apps, "disable", "disable an app", _app_switch(False), "app_id")
    command(apps, "enable", "enable an app", _app_switch(True), "app_id")
    p = command(
        apps,
        "rotate-secret",
        "a new client secret (printed once); the one before stays valid for --overlap seconds",
        app_rotate_secret,
        "app_id",
    )
    p.add_argument(
        "--overlap", type=int, help="seconds the secret before stays valid (default 3600; 0: none)"
    )

    p = command(sub, "usage", "free and paid calls used and remaining", usage)
    p.add_argument("--licence")
    p.add_argument("--dataset")
    p.add_argument("--licensee")
    p.add_argument("--period", help="YYYY-MM (default: this month in the billing time zone)")

    tokens = group("admin-token", "admin API tokens")
    p = command(tokens, "create", "create an admin token (printed once)", admin_token_create)
    p.add_argument("--role", required=True, choices=schemas.ROLES)
    p.add_argument("--licensee", help="for role licensee: the licensee it may see")
    p.add_argument("--description")
    p.add_argument("--expires-in", type=int, metavar="SECONDS", help="refused after this many seconds")
    command(tokens, "list", "list admin tokens", admin_token_list)
    command(tokens, "revoke", "revoke an admin token", admin_token_revoke, "token_id")
