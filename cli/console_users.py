"""``pdg console-user add|disable|reset|list``: the people who sign in to the
browser console (``console.users``). A password is generated and printed
once, or read from standard input (``--password-stdin``); ``--totp`` enrols
a TOTP authenticator and prints its ``otpauth://`` URI once."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from cli.resources import command_group, emit, migrated_engine
from config.settings import Settings
from console import ROLES
from core.errors import BadRequestError

if TYPE_CHECKING:
    from console.users import ConsoleUsers

Common = Callable[[argparse.ArgumentParser], None]


@contextlib.asynccontextmanager
async def _users(settings: Settings) -> AsyncIterator[ConsoleUsers]:
    from console.users import ConsoleUsers
    from storage.db import session_factory

    async with migrated_engine(settings) as engine:
        yield ConsoleUsers(session_factory(engine), settings.console)


def _stdin_password(args: argparse.Namespace) -> str | None:
    if not args.password_stdin:
        return None
    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise BadRequestError("--password-stdin: no password on standard input")
    return password


async def console_user_add(args: argparse.Namespace, settings: Settings) -> int:
    password = _stdin_password(args)
    async with _users(settings) as users:
        created = await users.add(
            args.username, args.role, licensee_id=args.licensee, password=password, totp=args.totp
        )
    data: dict[str, Any] = {
        "username": created.username,
        "role": created.role,
        "licensee_id": created.licensee_id,
    }
    lines = [f"console user {created.username} ({created.role}) created"]
    if password is None:
        data["password"] = created.password
        lines.append(f"password (shown once): {created.password}")
    if created.totp_uri is not None:
        data["totp_uri"] = created.totp_uri
        lines.append(f"TOTP (add to an authenticator app, shown once): {created.totp_uri}")
    emit(args, data, "\n".join(lines))
    return 0


async def console_user_disable(args: argparse.Namespace, settings: Settings) -> int:
    async with _users(settings) as users:
        await users.disable(args.username)
    emit(args, {"username": args.username, "disabled": True}, f"console user {args.username} disabled")
    return 0


async def console_user_reset(args: argparse.Namespace, settings: Settings) -> int:
    given = _stdin_password(args)
    async with _users(settings) as users:
        password = await users.reset(args.username, given)
    data: dict[str, Any] = {"username": args.username}
    text = f"console user {args.username}: new password set, lock-out cleared, sessions ended"
    if given is None:
        data["password"] = password
        text += f"\npassword (shown once): {password}"
    emit(args, data, text)
    return 0


async def console_user_list(args: argparse.Namespace, settings: Settings) -> int:
    async with _users(settings) as users:
        rows = await users.list()
    emit(args, rows, columns=("username", "role", "licensee_id", "totp", "disabled", "locked_until"))
    return 0


def add_commands(sub: Any, common: Common) -> None:
    command = command_group(
        sub, "console-user", "people who sign in to the browser console (/console/)", common
    )
    p = command("add", "add a console user (its password is printed once)", console_user_add)
    p.add_argument("username")
    p.add_argument("--role", required=True, choices=ROLES)
    p.add_argument("--licensee", help="for role developer: the licensee it works for")
    p.add_argument("--totp", action="store_true", help="enrol a TOTP authenticator (its URI is printed once)")
    p.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    p = command("disable", "disable a console user and end its sessions", console_user_disable)
    p.add_argument("username")
    p = command(
        "reset", "a new password (printed once); clears a lock-out and ends sessions", console_user_reset
    )
    p.add_argument("username")
    p.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    command("list", "list console users", console_user_list)
