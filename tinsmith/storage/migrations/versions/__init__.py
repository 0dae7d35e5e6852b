"""Revision scripts, loaded by Alembic by path (this file makes the folder a package, so it
ships with the wheel; Alembic itself skips it)."""
