"""Alembic environment: runs migrations on the async engine of the settings.

The caller (``storage.migrate``) hands the connection in through
``config.attributes["connection"]``; on PostgreSQL it already holds an
advisory lock so that replicas starting together migrate one at a time.
"""

from __future__ import annotations

from alembic import context

import billing.models  # noqa: F401  (registers the tables)
import console.models  # noqa: F401
import ledger.models  # noqa: F401
import licensing.models  # noqa: F401
from ledger.partitions import in_models
from storage.db import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
    include_object=in_models,
)
with context.begin_transaction():
    context.run_migrations()
