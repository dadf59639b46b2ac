"""Names of a run's positions for people: role names on role-aligned runs, the prompts' roles
on equal-length runs that carry them (``pathdb show --positional`` labels its bands with them)."""

from __future__ import annotations

import duckdb

from pathdb.positions import RoleError, token_names


def position_labels(con: duckdb.DuckDBPyConnection, run_id: int) -> dict[int, str] | None:
    """Position -> label: the run's role positions (``END``, ``S2-1``), else for prompts with
    roles ``index name`` (names of different prompts joined by ``/``), else None (plain indices)."""
    rows = con.execute(
        "SELECT position, name FROM positions WHERE run_id = ? ORDER BY position", [run_id]
    ).fetchall()
    if rows:
        return {int(p): str(n) for p, n in rows}
    prompts = con.execute(
        "SELECT roles FROM prompts WHERE run_id = ? ORDER BY prompt_idx", [run_id]
    ).fetchall()
    if not prompts or any(r is None for (r,) in prompts):
        return None
    names: dict[int, list[str]] = {}
    for (roles,) in prompts:
        try:
            per_token = token_names(roles)
        except RoleError:  # labels stored before role names were checked: keep indices
            return None
        for i, name in enumerate(per_token):
            if name not in names.setdefault(i, []):
                names[i].append(name)
    return {i: f"{i} {'/'.join(n)}" for i, n in names.items()}
