"""``pdg keys list|rotate``: the token-signing keys the replicas share
(``licensing.keys``). ``rotate`` makes a new key active: replicas sign with it
within ``server.catalogue_refresh_seconds``, and the one before keeps
verifying, and stays in the JWKS, until ``leaves_jwks_at``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from cli.resources import command_group, emit, migrated_engine
from config.settings import Settings
from core.errors import BadRequestError

Common = Callable[[argparse.ArgumentParser], None]
COLUMNS = ("kid", "alg", "active", "created_at", "activated_at", "retired_at", "leaves_jwks_at")


def _store(settings: Settings, engine: Any) -> Any:
    from licensing.keys import FILE_KEYS, key_store
    from storage.db import session_factory

    store = key_store(settings, session_factory(engine))
    if store is None:
        raise BadRequestError(FILE_KEYS)
    return store


async def keys_list(args: argparse.Namespace, settings: Settings) -> int:
    async with migrated_engine(settings) as engine:
        infos = await _store(settings, engine).listing()
    emit(args, [info.as_dict() for info in infos], columns=COLUMNS)
    return 0


async def keys_rotate(args: argparse.Namespace, settings: Settings) -> int:
    from licensing.keys import legacy_key

    async with migrated_engine(settings) as engine:
        store = _store(settings, engine)
        await store.active(first=legacy_key(settings))  # the key to retire, if none was made yet
        key = await store.rotate(args.algorithm or settings.tokens.algorithm)
        info = next(i for i in await store.listing() if i.kid == key.kid)
    emit(
        args,
        info.as_dict(),
        f"key {key.kid} ({key.alg}) signs from now on; replicas switch within "
        f"{settings.server.catalogue_refresh_seconds:g} s",
    )
    return 0


def add_commands(sub: Any, common: Common) -> None:
    command = command_group(sub, "keys", "the token-signing keys every replica shares", common)
    command("list", "list the signing keys: active, retired and until when they verify", keys_list)
    p = command(
        "rotate", "make a new signing key active on every replica; the one before retires", keys_rotate
    )
    p.add_argument(
        "--algorithm", choices=("ES256", "EdDSA", "SM2"), help="of the new key (default: tokens.algorithm)"
    )
