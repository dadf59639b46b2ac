"""Run names: what a user may call a run, checked before anything is loaded or written."""

from __future__ import annotations

import unicodedata

from pathdb.store.errors import StoreError

MAX_NAME_LENGTH = 200


def check_run_name(name: str) -> str:
    """Return ``name`` if it is a usable run name, else raise :class:`StoreError` saying why.

    Names are shown in tables and typed in commands, so they must be non-empty, not only
    whitespace, free of control characters and of reasonable length. An all-digit name is allowed:
    run references try the exact name before reading digits as a run id.
    """
    if not name.strip():
        raise StoreError(
            "--run-name must not be empty or only whitespace; give a name such as ioi-exact"
        )
    bad = [c for c in name if unicodedata.category(c).startswith("C")]
    if bad:
        raise StoreError(
            f"--run-name {name!r} contains control characters ({', '.join(map(repr, bad[:3]))}); "
            "use printable characters only"
        )
    if name != name.strip():
        raise StoreError(f"--run-name {name!r} starts or ends with whitespace; remove it")
    if len(name) > MAX_NAME_LENGTH:
        raise StoreError(
            f"--run-name is {len(name)} characters long; use at most {MAX_NAME_LENGTH}"
        )
    return name
