"""Who an administrative change is made by, for the admin audit log
(``ledger.admin_log``): set around an admin API request or a ``pdg``
command, read where the change is written. Kept apart (no imports) so the
CLI can set it before it loads anything else."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

#: ``admin-token:<id> (<role>)``, ``cli:<user>@<host>``, or ``system``.
ACTOR: ContextVar[str] = ContextVar("pdg_admin_actor", default="system")


@contextlib.contextmanager
def acting_as(actor: str) -> Iterator[None]:
    """Changes made inside the block are logged as ``actor``'s."""
    token = ACTOR.set(actor)
    try:
        yield
    finally:
        ACTOR.reset(token)
