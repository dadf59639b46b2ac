"""Registers an Alembic DDL implementation for duckdb-engine's ``duckdb`` dialect (DESIGN.md 6)."""

from __future__ import annotations

from alembic.ddl.impl import DefaultImpl


class DuckDBImpl(DefaultImpl):
    """Alembic implementation for DuckDB: generic DDL, transactional (DuckDB rolls back DDL)."""

    __dialect__ = "duckdb"
    transactional_ddl = True
