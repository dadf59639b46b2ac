"""``pathdb serve``: the interactive explorer of a store in the browser (read-only, local)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import DB_OPTION, err, friendly, out


@friendly
def serve(
    db: Annotated[Path, DB_OPTION] = Path("pathdb.duckdb"),
    port: Annotated[
        int, typer.Option("--port", "-p", min=0, max=65535, help="TCP port (0: any free port).")
    ] = 8765,
    host: Annotated[
        str,
        typer.Option(
            "--host", help="Address to bind. Only loopback addresses unless --allow-public."
        ),
    ] = "127.0.0.1",
    allow_public: Annotated[
        bool,
        typer.Option(
            "--allow-public",
            help="Allow a non-loopback --host: anyone who reaches it can read the whole store (there is no login).",
        ),
    ] = False,
) -> None:
    """Explore the store in the browser: runs, circuits, the search tree, cross-prompt heatmaps,
    faithfulness curves. Read-only; works while a search writes the store (refresh to follow it).

    Examples:

      pathdb serve                       # http://127.0.0.1:8765/

      pathdb serve --db runs.duckdb --port 0
    """
    from pathdb.serve import server

    def announce(url: str) -> None:
        if server.is_loopback(host):
            scope = f"bound to {host} only: other machines cannot reach it"
        else:
            scope = f"[bold yellow]bound to {host}: reachable from other machines, with no login[/]"
        out.print(f"pathdb explorer of {db} at {url}", highlight=False, soft_wrap=True)
        out.print(f"{scope}; read-only; Ctrl-C stops it", highlight=False, soft_wrap=True)

    if allow_public and not server.is_loopback(host):
        err.print(
            f"[bold yellow]warning:[/] --allow-public binds {host}: anyone who can reach this "
            "machine can read every run in the store (the explorer has no authentication)",
            highlight=False, soft_wrap=True,
        )  # fmt: skip
    server.serve(db, host=host, port=port, allow_public=allow_public, announce=announce)
