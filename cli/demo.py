"""``pdg demo``: the whole gateway in one process on the embedded defaults
(SQLite + embedded Valkey), with the three sample data services of
``samples.upstreams`` as upstreams, a seeded licensee, licence and app, and
copy-paste steps printed for an app developer and for the operating company.

Without ``--data-dir`` the demo lives in a temporary folder removed on exit.
With one, the catalogue is kept between runs and each run registers a fresh
demo app, since a client secret is shown only once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shlex
import signal
import socket
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

from aiohttp import web

from config.settings import Settings, load_settings
from core.errors import ConflictError, NotFoundError
from gateway.app import create_app
from gateway.state import ADMIN_TOKENS, REGISTRY
from licensing import schemas
from licensing.credit_code import with_check_character
from licensing.registry import Registry
from samples.upstreams import SAMPLE_DATASETS, start_sample_upstream

DEMO_LICENSEE = "wuhan-smart-city-tech"
DEMO_LICENCE = "licence-demo-2026"
CLOSED_DATASET = "household-register"


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


async def seed(registry: Registry, upstream_base: str) -> schemas.App:
    """Catalogue, licensee and licence (once), and a new app (every run)."""
    split = schemas.RevenueSplit(provider="0.5", operator="0.3", public_fund="0.2")
    for sample in SAMPLE_DATASETS:
        with contextlib.suppress(ConflictError):
            await registry.create_dataset(
                schemas.DatasetIn(
                    id=sample.id,
                    name=sample.name,
                    provider=sample.provider,
                    upstream_url=f"{upstream_base}{sample.prefix}",
                    classification=sample.classification,
                    open_class=sample.open_class,
                    free_monthly_calls=1000,
                    price=schemas.Price(per_call_fen="2.5"),
                    revenue_split=split,
                )
            )
    with contextlib.suppress(ConflictError):
        await registry.create_dataset(
            schemas.DatasetIn(
                id=CLOSED_DATASET,
                name="Household register (户籍信息) - on the negative list",
                provider="public-security",
                upstream_url=f"{upstream_base}/household",
                classification=4,
                open_class="closed",
                revenue_split=split,
            )
        )
    try:
        await registry.get_licensee(DEMO_LICENSEE)
    except NotFoundError:
        await registry.create_licensee(
            schemas.LicenseeIn(
                id=DEMO_LICENSEE,
                name="武汉智慧城市科技有限公司 (Wuhan Smart City Tech Co.)",
                credit_code=with_check_character("91420100MA4K8B7J2"),
                contact="data-office@example.com",
            )
        )
    try:
        await registry.get_licence(DEMO_LICENCE)
    except NotFoundError:
        await registry.create_licence(
            schemas.LicenceIn(
                id=DEMO_LICENCE,
                licensee_id=DEMO_LICENSEE,
                datasets=[*(s.id for s in SAMPLE_DATASETS), CLOSED_DATASET],
                max_classification=2,
                purposes=["public-interest", "industrial"],
                valid_from=datetime(2026, 1, 1, tzinfo=UTC),
                valid_until=datetime(2028, 12, 31, tzinfo=UTC),
                security_officer="Li Wei (李伟), security officer",
                paid=schemas.Paid(prepaid_calls=10_000),
            )
        )
    return await registry.create_app(schemas.AppIn(licensee_id=DEMO_LICENSEE, name="demo-app"))


def instructions(base: str, upstream: str, data_dir: Path, app: schemas.App, admin_token: str) -> str:
    datasets = " ".join(f"dataset:{s.id}" for s in SAMPLE_DATASETS)
    weather = next(s for s in SAMPLE_DATASETS if s.id == "weather-obs")
    urls = [f"{base}/data/{s.id}/{quote(s.example_path, safe='/?=&')}" for s in SAMPLE_DATASETS]
    examples = "\n".join(f'   curl -s -H "Authorization: Bearer $TOKEN" {shlex.quote(url)}' for url in urls)
    secret = app.client_secret or ""
    return f"""
pdg demo is running at {base}
  data folder:       {data_dir}
  sample upstreams:  {upstream}  ({", ".join(s.id for s in SAMPLE_DATASETS)})
  negative list:     {CLOSED_DATASET} (never served)
  licensee / licence: {DEMO_LICENSEE} / {DEMO_LICENCE}
  app (client_id):   {app.client_id}

1. Get an access token (client credentials, client_secret_basic):
   TOKEN=$(curl -s -u {shlex.quote(f"{app.client_id}:{secret}")} -d grant_type=client_credentials \\
     --data-urlencode {shlex.quote(f"scope=purpose:public-interest {datasets}")} \\
     {base}/oauth/token | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')

2. Call the datasets through the gateway:
{examples}

3. See refused calls as problem JSON (RFC 9457):
   curl -s {base}/data/{weather.id}/stations                              # no token -> 401 token-required
   curl -s -H "Authorization: Bearer $TOKEN" {base}/data/{CLOSED_DATASET}/persons   # -> 403 dataset-closed
   curl -s -H "Authorization: Bearer $TOKEN" {base}/data/no-such-dataset/x         # -> 404 unknown-dataset

4. Operate it (admin API, role licence-admin):
   ADMIN={admin_token}
   curl -s -H "Authorization: Bearer $ADMIN" {base}/admin/v1/licences
   curl -s -X POST -H "Authorization: Bearer $ADMIN" {base}/admin/v1/licences/{DEMO_LICENCE}/suspend
   # ...step 2 now answers 403 licence-inactive; /resume undoes it.
   The API is described at {base}/admin/v1/openapi.json

5. Audit the call record (every call above that carried a token has one):
   curl -s -H "Authorization: Bearer $ADMIN" {base}/admin/v1/calls
   pdg audit verify --data-dir {shlex.quote(str(data_dir))}

Press Ctrl-C to stop.
"""


async def _run(args: argparse.Namespace) -> int:
    host = args.host
    port = args.port or _free_port(host)
    with contextlib.ExitStack() as stack:
        data_dir = (
            Path(args.data_dir)
            if args.data_dir
            else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pdg-demo-")))
        )
        settings: Settings = load_settings(
            overrides={
                "data_dir": str(data_dir),
                "server.host": host,
                "server.port": port,
                "server.public_url": f"http://{host}:{port}",
            }
        )
        upstream_runner, upstream_port = await start_sample_upstream(host)
        upstream = f"http://{host}:{upstream_port}"
        app = create_app(settings)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
            demo_app = await seed(app[REGISTRY], upstream)
            admin = await app[ADMIN_TOKENS].create(
                schemas.AdminTokenIn(role="licence-admin", description="pdg demo")
            )
            print(
                instructions(settings.public_url, upstream, settings.data_dir, demo_app, admin.token),
                flush=True,
            )
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
        finally:
            await runner.cleanup()
            await upstream_runner.cleanup()
    print("pdg demo stopped.", flush=True)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))
