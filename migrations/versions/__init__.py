"""Alembic revision scripts of the pathdb store."""
