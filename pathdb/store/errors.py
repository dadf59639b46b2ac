"""Errors raised by the store: one class whose message says what went wrong and how to fix it."""

from __future__ import annotations


class StoreError(RuntimeError):
    """A store problem the user can act on (the CLI prints the message without a traceback)."""
