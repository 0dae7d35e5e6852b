"""Alembic migrations of the metadata database (tinsmith/storage/models.py's tables).

They run programmatically, without an alembic.ini: `tinsmith.storage.migrate` builds the Alembic
`Config` (`alembic_config`) and hands env.py an open connection, inside the transaction
that also holds the schema lock. `versions/` holds one file per revision; each is a frozen
snapshot in plain SQLAlchemy types (no imports from models.py), so later model changes never
rewrite history.

Adding a revision: change the models in models.py, then add the next file to `versions/`
(script.py.mako is the template; `alembic.autogenerate.produce_migrations` against a
database at the previous head lists the operations). tests/test_migrations.py checks that a
database migrated to head has exactly the schema of the models.
"""
