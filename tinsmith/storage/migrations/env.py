"""Alembic environment: online migrations over the connection that tinsmith.storage.migrate
passes in `config.attributes["connection"]`, already inside a transaction (so Alembic
opens none of its own and the whole upgrade commits or rolls back at once)."""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from tinsmith.storage.migrate import migration_options
from tinsmith.storage.models import target_metadata

connection: Connection | None = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("tinsmith migrations run through tinsmith.storage.db (or `tinsmith db "
                       "upgrade`), which passes them a connection; there is no offline mode")

# render_as_batch on SQLite, which cannot ALTER most things in place: batch operations copy
# the table when needed.
context.configure(connection=connection, target_metadata=target_metadata(), compare_type=True,
                  **migration_options(connection))
with context.begin_transaction():
    context.run_migrations()
