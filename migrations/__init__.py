"""Alembic migrations for the pathdb DuckDB store, run programmatically (no ``alembic`` CLI needed).

``make_config()`` builds an :class:`alembic.config.Config` from the ``alembic.ini`` shipped inside
this package; pass an open SQLAlchemy connection in ``config.attributes["connection"]`` so the
migration runs on the caller's (single) DuckDB connection and lock.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from alembic.config import Config

PACKAGE_DIR = Path(__file__).resolve().parent
INI_PATH = PACKAGE_DIR / "alembic.ini"


def make_config(connection: Any = None, url: str | None = None) -> Config:
    """An Alembic config pointing at this package; ``connection`` (SQLAlchemy) is used if given."""
    from alembic.config import Config

    cfg = Config(str(INI_PATH))
    cfg.set_main_option("script_location", str(PACKAGE_DIR))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url)
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg
