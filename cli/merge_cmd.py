"""``pathdb merge``: combine stores written on different machines (one per job) into one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import Rows, friendly, out, show_rows


@friendly
def merge(
    out_db: Annotated[
        Path,
        typer.Argument(
            metavar="OUT",
            help="Store to merge into (created if missing; an existing pathdb store is added to).",
        ),
    ],
    inputs: Annotated[
        list[Path],
        typer.Argument(metavar="IN...", help="Stores to merge (opened read-only, never changed)."),
    ],
    force: Annotated[
        bool,
        typer.Option("--force", help="Overwrite OUT when it exists but is not a pathdb store."),
    ] = False,
) -> None:
    """Merge the runs of IN... into OUT: run ids remapped, nothing duplicated.

    A run already in OUT (same name, created_at and model fingerprint) is skipped, so merging the same store twice adds nothing; a different run whose name is taken is renamed NAME@STEM (STEM: the input file's name without extension).

    Examples:

      pathdb merge all.duckdb job-*.duckdb
    """
    from pathdb.store.merge import merge_stores, summary

    reports = merge_stores(out_db, inputs, force=force)
    rows = summary(reports)
    cols = list(rows[0])
    show_rows(
        Rows.typed(
            cols,
            ["VARCHAR", "BIGINT", "BIGINT", "BIGINT", "VARCHAR", "BIGINT"],
            [tuple(r.values()) for r in rows],
        ),
        title=f"merged into {out_db}",
    )
    added = sum(len(r.added) + len(r.refreshed) for r in reports)
    out.print(
        f"[green]{added} run(s) merged into {out_db}[/]; list them with `pathdb runs --db {out_db}`"
    )
