"""The ``pdg`` command line.

Every command reads the same settings (``--config`` TOML file, ``PDG_*``
variables, flags), so ``pdg admin-token create`` acts on the deployment that
``pdg serve`` runs. Bad input ends with one line on stderr, ``pdg: error: ...``,
and a non-zero exit (2 for usage, 1 for everything else); never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import os
import socket
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, NoReturn

from cli import audit as cli_audit
from cli import billing as cli_billing
from cli import console_users as cli_console_users
from cli import keys as cli_keys
from cli import resources as cli_resources
from config.settings import ConfigurationError, Settings, load_settings
from core.actor import acting_as
from core.errors import GatewayError
from gateway import __version__

Command = Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]]


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"pdg: error: {message} (see '{self.prog} --help')\n")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML settings file (also $PDG_CONFIG)")
    parser.add_argument("--data-dir", help="data folder of the embedded defaults (also $PDG_DATA_DIR)")


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="pdg", description="pdg, the Public Data Gateway.")
    parser.add_argument("--version", action="version", version=f"pdg {__version__}")
    parser.add_argument(
        "--config", dest="global_config", metavar="CONFIG", help="TOML settings file (also $PDG_CONFIG)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    sub.required = True

    serve = sub.add_parser("serve", help="run the gateway")
    _common(serve)
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8080)")
    serve.add_argument("--workers", type=int, help="worker processes sharing the port (default 1)")
    serve.set_defaults(run=None)  # serving owns its event loop: see main()

    worker = sub.add_parser("worker", help="run the ledger writer (moves the call-record log into SQL)")
    _common(worker)
    worker.set_defaults(run=_worker)

    demo = sub.add_parser("demo", help="everything in one process, with sample data services")
    demo.add_argument("--port", type=int, default=8080, help="gateway port (default 8080; 0 = any free port)")
    demo.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    demo.add_argument("--data-dir", help="keep the demo's data here (default: a temporary folder)")
    demo.set_defaults(run=None)

    db = sub.add_parser("db", help="database schema")
    db_sub = db.add_subparsers(dest="action", metavar="ACTION", parser_class=OneLineParser)
    db_sub.required = True
    up = db_sub.add_parser("upgrade", help="migrate the schema to the newest revision")
    _common(up)
    up.add_argument("--json", action="store_true", help="machine-readable output")
    up.set_defaults(run=_db_upgrade)
    cur = db_sub.add_parser("current", help="show the schema revision")
    _common(cur)
    cur.add_argument("--json", action="store_true", help="machine-readable output")
    cur.set_defaults(run=_db_current)

    config = sub.add_parser("config", help="the effective settings")
    config_sub = config.add_subparsers(dest="action", metavar="ACTION", parser_class=OneLineParser)
    config_sub.required = True
    show = config_sub.add_parser("show", help="print the effective settings, secrets masked")
    _common(show)
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(run=_config_show)

    cli_resources.add_commands(sub, _common)
    cli_audit.add_commands(sub, _common)
    cli_billing.add_commands(sub, _common)
    cli_keys.add_commands(sub, _common)
    cli_console_users.add_commands(sub, _common)
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        "data_dir": getattr(args, "data_dir", None),
        "server.host": getattr(args, "host", None) if args.command == "serve" else None,
        "server.port": getattr(args, "port", None) if args.command == "serve" else None,
        "server.workers": getattr(args, "workers", None) if args.command == "serve" else None,
    }
    config = getattr(args, "config", None) or getattr(args, "global_config", None)
    return load_settings(config, overrides=overrides)


async def _config_show(args: argparse.Namespace, settings: Settings) -> int:
    """The settings from the file, ``PDG_*`` variables (or their ``_FILE``
    forms) and flags, as the gateway would run with them; secrets masked."""
    from config.settings import masked

    tree = masked(settings)
    lines: list[str] = []
    for section, values in tree.items():
        if not isinstance(values, dict):
            lines.append(f"{section} = {json.dumps(values, ensure_ascii=False)}")
    for section, values in tree.items():
        if isinstance(values, dict):
            lines.append(f"\n[{section}]")
            lines.extend(f"{k} = {json.dumps(v, ensure_ascii=False)}" for k, v in values.items())
    cli_resources.emit(args, tree, "\n".join(lines))
    return 0


async def _db_upgrade(args: argparse.Namespace, settings: Settings) -> int:
    from storage import migrate
    from storage.db import create_engine

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = create_engine(settings.database_url)
    try:
        await migrate.upgrade(engine)
        revision = await migrate.current_revision(engine)
    finally:
        await engine.dispose()
    cli_resources.emit(args, {"revision": revision}, f"database at revision {revision}")
    return 0


async def _db_current(args: argparse.Namespace, settings: Settings) -> int:
    from storage import migrate
    from storage.db import create_engine

    engine = create_engine(settings.database_url)
    try:
        revision = await migrate.current_revision(engine)
    finally:
        await engine.dispose()
    head = migrate.head_revision()
    cli_resources.emit(
        args, {"revision": revision, "head": head}, f"database at revision {revision} (newest {head})"
    )
    return 0


async def _worker(args: argparse.Namespace, settings: Settings) -> int:
    """The ledger writer on its own, until SIGINT or SIGTERM: one of any
    number of ``pdg worker`` (and ``pdg serve``) processes holds the writer
    lock and works; the others stand by."""
    from gateway import logs

    logs.configure(settings.logging.level, settings.logging.format)
    import signal

    from cli.serve import prepare
    from ledger import process
    from licensing.ids import new_call_id

    await prepare(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    sys.stderr.write("pdg worker: moving the call-record log into the ledger (Ctrl-C stops)\n")
    await process.run(settings, owner=f"worker-{new_call_id()}", stop=stop)
    return 0


def _fail(message: str, code: int = 1) -> int:
    sys.stderr.write(f"pdg: error: {message}\n")
    return code


#: Errors of modules that are imported only when needed (so that ``--help``
#: and bad input answer quickly): ``(module, class)``. A module that was never
#: imported cannot have raised its error.
_ONE_LINE_ERRORS = (
    ("core.sm2", "SMUnavailableError"),
    ("licensing.keys", "KeyFileError"),
    ("licensing.keys", "KeyStoreError"),
    ("licensing.personal", "PersonalKeyError"),
    ("storage.redis", "EmbeddedValkeyError"),
)


def _loaded(module: str, name: str) -> type[BaseException] | None:
    loaded = sys.modules.get(module)
    error = getattr(loaded, name, None) if loaded is not None else None
    return error if isinstance(error, type) and issubclass(error, BaseException) else None


def _one_line(exc: Exception) -> str | None:
    """The one-line reason for an expected failure, or ``None`` for a bug."""
    if isinstance(exc, ConfigurationError | GatewayError):
        return str(getattr(exc, "detail", exc)).splitlines()[0]
    for module, name in _ONE_LINE_ERRORS:
        error = _loaded(module, name)
        if error is not None and isinstance(exc, error):
            return str(exc).splitlines()[0]
    sqlalchemy_error = _loaded("sqlalchemy.exc", "SQLAlchemyError")
    if sqlalchemy_error is not None and isinstance(exc, sqlalchemy_error):
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        return f"database: {reason}"
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with acting_as(f"cli:{_operator()}"):
        return _run(args)


def _operator() -> str:
    """``user@host`` of whoever runs the command (for the admin audit log)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
    return f"{user}@{socket.gethostname()}"


def _run(args: argparse.Namespace) -> int:
    try:
        settings = _settings(args)
        if args.command == "serve":
            from cli.serve import serve

            return serve(settings)
        if args.command == "demo":
            from cli.demo import run_demo

            return run_demo(args)
        command: Command = args.run
        return asyncio.run(command(args, settings))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        reason = _one_line(exc)
        if reason is None:
            raise
        return _fail(reason)


if __name__ == "__main__":
    sys.exit(main())
