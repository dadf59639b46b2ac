"""``pathdb search --each -p A -p B -m X -m Y``: one run per (prompt set, model) pair, in one
command.

Each run is named ``PROMPTS/MODEL`` (with ``--run-name NAME``: ``NAME/PROMPTS/MODEL``), where
PROMPTS is a bundled set's name or a prompt file's stem and MODEL a model's name or a checkpoint
directory's last component. Names that collide, with each other or with runs already in the
store, are refused before anything is loaded or written. The runs go through
:func:`search.runner.run_many`: with ``--workers`` one Ray pool searches them all (a batch run
one task, a per-prompt run one task per prompt), without it they run here one after another;
every run is created up front, so after Ctrl-C or a killed driver each one not completed is
continued by ``pathdb resume NAME``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer

from cli.common import Rows, err, out, show_rows
from search.runner import RunInterrupted, RunResult, SearchError, SearchRequest


def run_names(prompt_sets: list[str], models: list[str], prefix: str | None) -> list[str]:
    """The run names of the cross product, prompt set major; refuses a name given twice."""
    from pathdb.models import bundled_names
    from pathdb.prompts import bundled_prompt_sets

    sets, toys = bundled_prompt_sets(), bundled_names()
    seen: dict[str, tuple[str, str]] = {}
    names = []
    for p in prompt_sets:
        p_part = p if p in sets else Path(p).stem
        for m in models:
            m_part = m if m in toys or not Path(m).expanduser().is_dir() else Path(m).name
            name = "/".join(x for x in (prefix, p_part, m_part) if x is not None)
            if name in seen:
                raise SearchError(
                    f"-p {seen[name][0]} -m {seen[name][1]} and -p {p} -m {m} would both be run "
                    f"{name!r}: give each -p / -m once, and prompt files (or model directories) "
                    "distinct names"
                )
            seen[name] = (p, m)
            names.append(name)
    return names


def _check_inputs(prompt_sets: list[str], names: list[str], db: Path) -> None:
    """Refuse unknown prompt sets and run names already in the store, before any model loads."""
    from pathdb.prompts import bundled_prompt_sets
    from pathdb.store.db import open_store
    from pathdb.store.errors import StoreError

    sets = bundled_prompt_sets()
    for p in prompt_sets:
        if p not in sets and not Path(p).expanduser().is_file():
            raise SearchError(
                f"-p {p}: no such prompt file or bundled prompt set; pass a JSONL file or one of: "
                f"{', '.join(sets)}"
            )
    if not db.exists():
        return
    try:
        store = open_store(db, read_only=True)
    except StoreError:
        return  # a store that needs an upgrade: run_many checks the names once it is opened
    with store:
        taken = [
            n
            for n in names
            if store.con.execute("SELECT 1 FROM runs WHERE name = ?", [n]).fetchall()
        ]
    if taken:
        raise SearchError(
            f"run {taken[0]!r} already exists in {db} ({len(taken)} of the {len(names)} run names "
            "are taken); choose another --run-name prefix, or `pathdb resume` the runs"
        )


def search_many(
    req: SearchRequest,
    prompt_sets: list[str],
    models: list[str],
    db: Path,
    *,
    run_name: str | None,
    replace: bool,
    quiet: bool,
    threads: int,
    workers: int | None,
    ray_address: str | None,
) -> None:
    """Search ``req`` on every (prompt set, model) pair into ``db`` and report each run."""
    from search.runner import run_many

    if replace:
        raise SearchError(
            "--replace overwrites one run; with several -p / -m give a new --run-name prefix instead"
        )
    if req.clean is not None:
        raise SearchError(
            "--each searches prompt sets (-p); a single --prompt is one run: drop --each"
        )
    names = run_names(prompt_sets, models, run_name)
    _check_inputs(prompt_sets, names, db)
    reqs = [dataclasses.replace(req, prompts=p, model=m) for p in prompt_sets for m in models]
    try:
        results = run_many(
            reqs,
            db,
            run_names=names,
            quiet=quiet,
            threads=threads,
            workers=workers,
            ray_address=ray_address,
        )
    except RunInterrupted:
        _report_interrupted(names, db)
        raise typer.Exit(130) from None
    _report(results, db)


def _report(results: list[RunResult], db: Path) -> None:
    """One row per run, then what to do next."""
    columns = ["name", "run_id", "status", "n_evaluated", "n_complete", "n_kept_complete", "wall_s"]
    rows = Rows(
        columns,
        [c not in ("name", "status") for c in columns],
        [
            (
                r.name,
                r.run_id,
                r.status,
                r.n_evaluated,
                r.n_complete,
                r.n_kept_complete,
                round(r.wall_s, 1),
            )
            for r in results
        ],
    )
    show_rows(rows, title=f"{len(results)} runs -> {db}")
    first = results[0].name
    out.print(
        f"next: [bold]pathdb runs --db {db}[/] | pathdb query paths {first} | pathdb show {first} -o circuit.svg",
        highlight=False,
    )


def _report_interrupted(names: list[str], db: Path) -> None:
    """After Ctrl-C: the runs left to finish, each with its resume command."""
    from pathdb.store.db import open_store

    with open_store(db, read_only=True) as store:
        status = dict(
            store.con.execute(
                "SELECT name, status FROM runs WHERE name IN (SELECT unnest(?))", [names]
            ).fetchall()
        )
    rest = [n for n in names if status.get(n) != "completed"]
    err.print(
        f"[yellow]interrupted[/]: {len(names) - len(rest)} of {len(names)} runs completed; continue "
        "the others with " + "; ".join(f"`pathdb resume {n} --db {db}`" for n in rest),
        highlight=False,
        soft_wrap=True,
    )
