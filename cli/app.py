"""The ``pathdb`` command: search once, query forever.

``pathdb search`` finds the paths that carry a behaviour and stores every evaluated path in a
DuckDB file; ``pathdb query``, ``export`` and ``show`` read that file without touching the model.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

from cli import admin_cmd, attribute_cmd, evaluate_cmd, export_cmd, merge_cmd, query_cmd, serve_cmd
from cli.common import (
    DB_OPTION,
    PROMPT_OPTION,
    PROMPTS,
    REPLACE_OPTION,
    RUN_NAME_OPTION,
    STORE,
    Rows,
    check_one_prompt_source,
    err,
    fail,
    friendly,
    out,
    show_rows,
)

if TYPE_CHECKING:
    from search.runner import RunInterrupted, RunResult

app = typer.Typer(
    name="pathdb",
    help=(
        "Find the computational paths through a transformer that carry a behaviour (IPE path "
        "message / attribution patching), keep every evaluated path in DuckDB, then query, "
        "export and draw circuits.\n\n"
        "Quick start (offline, bundled toy model and IOI prompts):\n\n"
        "  pathdb search --run-name demo\n\n"
        "  pathdb query paths demo\n\n"
        "  pathdb query signed demo\n\n"
        "  pathdb show demo -o circuit.svg"
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        out.print(f"pathdb {version('pathdb')}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            "-V",
            help="Print the pathdb version and exit.",
            callback=_version,
            is_eager=True,
        ),
    ] = False,
) -> None:
    """Find the computational paths through a transformer that carry a behaviour."""


app.add_typer(query_cmd.app, name="query")
app.add_typer(admin_cmd.models_app, name="models")
app.add_typer(admin_cmd.db_app, name="db")
app.add_typer(admin_cmd.prompts_app, name="prompts")
app.command("export")(export_cmd.export)
app.command("show")(export_cmd.show)
app.command("sql")(query_cmd.sql_command)
app.command("evaluate")(evaluate_cmd.evaluate)
app.command("compare")(evaluate_cmd.compare)
app.command("attribute")(attribute_cmd.attribute)
app.command("serve")(serve_cmd.serve)
app.command("merge")(merge_cmd.merge)

DEFAULT_PROMPTS = "toy-ioi-small"
SEARCH = "Search"


@app.command(no_args_is_help=False)
@friendly
def search(
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            "-m",
            metavar="<str>",
            help="Bundled toy name (see `pathdb models`), a TransformerLens name such as gpt2-small, or a local Hugging Face checkpoint directory. Default: toy-ioi. With --each, repeat -m (and/or -p); otherwise the last one counts.",
            rich_help_panel=SEARCH,
        ),
    ] = None,
    prompts: Annotated[
        list[str] | None,
        typer.Option(
            "--prompts",
            "-p",
            metavar="<str>",
            help="Bundled prompt set name or a JSONL file (see README: prompt files). Default: toy-ioi-small. With --each, repeat -p (and/or -m); otherwise the last one counts.",
            rich_help_panel=PROMPTS,
        ),
    ] = None,
    prompt: Annotated[str | None, PROMPT_OPTION] = None,
    target: Annotated[
        str | None,
        typer.Option(
            "--target",
            help="Target token for --prompt (must be one token).",
            rich_help_panel=PROMPTS,
        ),
    ] = None,
    counterfactual: Annotated[
        str | None,
        typer.Option(
            "--counterfactual",
            help="Counterfactual prompt for --prompt (same token length).",
            rich_help_panel=PROMPTS,
        ),
    ] = None,
    cf_target: Annotated[
        str | None,
        typer.Option(
            "--cf-target",
            help="Counterfactual target token for --prompt (logit-diff metric).",
            rich_help_panel=PROMPTS,
        ),
    ] = None,
    method: Annotated[
        str,
        typer.Option(
            "--method",
            help="exact (path message patching), attribution (path attribution patching; complete paths scored exactly) or hybrid (attribution proposes, exact confirms).",
            rich_help_panel=SEARCH,
        ),
    ] = "exact",
    strategy: Annotated[
        str,
        typer.Option(
            "--strategy",
            "-s",
            help="threshold, best-first, level-width, or exhaustive (every path scored exactly: ground truth for small models, refused above --max-paths).",
            rich_help_panel=SEARCH,
        ),
    ] = "threshold",
    min_contribution: Annotated[
        float,
        typer.Option(
            "--min-contribution",
            "-t",
            help="threshold: keep extensions with |score| >= this, in metric units (logit-diff: logits; *-pct: percent points).",
            rich_help_panel=SEARCH,
        ),
    ] = 0.05,
    include_negative: Annotated[
        bool,
        typer.Option(
            "--include-negative/--positive-only",
            help="Keep paths that push the metric down too (|score|), or only positive ones.",
            rich_help_panel=SEARCH,
        ),
    ] = True,
    top_n: Annotated[
        int,
        typer.Option(
            "--top-n",
            help="best-first: stop after this many complete paths.",
            rich_help_panel=SEARCH,
        ),
    ] = 100,
    max_time: Annotated[
        float | None,
        typer.Option(
            "--max-time",
            help="Stop the search after this many seconds (any strategy).",
            rich_help_panel=SEARCH,
        ),
    ] = None,
    max_width: Annotated[
        int,
        typer.Option(
            "--max-width", help="level-width: partial paths kept per depth.", rich_help_panel=SEARCH
        ),
    ] = 100,
    max_queue: Annotated[
        int,
        typer.Option(
            "--max-queue",
            help="best-first: bound on the priority queue (worst entries dropped).",
            rich_help_panel=SEARCH,
        ),
    ] = 1_000_000,
    recall: Annotated[
        bool,
        typer.Option(
            "--recall/--no-recall",
            help="threshold: recall mode, which misses almost no complete path above -t: every pruned partial gets a look-ahead (bounded input-started extensions, scored exactly where the bound reaches --partial-factor x -t; expanded when its other extensions' estimated sign-split mass does), about 1-3.5x the evaluations.",
            rich_help_panel=SEARCH,
        ),
    ] = False,
    partial_factor: Annotated[
        float,
        typer.Option(
            "--partial-factor",
            help="--recall: the look-ahead's slack: bounds and estimated masses are compared with this x -t (0 < f <= 1).",
            rich_help_panel=SEARCH,
        ),
    ] = 0.25,
    max_paths: Annotated[
        int,
        typer.Option(
            "--max-paths",
            help="exhaustive: refuse when the search would evaluate more paths than this (counted before anything runs).",
            rich_help_panel=SEARCH,
        ),
    ] = 2_000_000,
    max_depth: Annotated[
        int | None,
        typer.Option(
            "--max-depth",
            help="Do not extend paths beyond this many nodes (excluding logits).",
            rich_help_panel=SEARCH,
        ),
    ] = None,
    batch_heads: Annotated[
        bool,
        typer.Option(
            "--batch-heads",
            help="exact: score a whole attention layer first, split into heads only if it passes.",
            rich_help_panel=SEARCH,
        ),
    ] = False,
    batch_positions: Annotated[
        bool,
        typer.Option(
            "--batch-positions",
            help="exact: score all key/value sources of a head first, split only if it passes.",
            rich_help_panel=SEARCH,
        ),
    ] = False,
    split_kv: Annotated[
        bool,
        typer.Option(
            "--split-kv",
            help="Score key and value sides of a head separately (MIB's k / v split).",
            rich_help_panel=SEARCH,
        ),
    ] = False,
    metric: Annotated[
        str,
        typer.Option(
            "--metric",
            help="logit-diff, target-logit-pct, target-prob-pct, kl, indirect-effect.",
            rich_help_panel=SEARCH,
        ),
    ] = "logit-diff",
    patch: Annotated[
        str,
        typer.Option(
            "--patch",
            help="Start message: counterfactual (clean - counterfactual), zero (clean) or mean (clean - mean over prompts).",
            rich_help_panel=SEARCH,
        ),
    ] = "counterfactual",
    positional: Annotated[
        bool,
        typer.Option(
            "--positional/--no-positional",
            help="Positional nodes (one per position) or position-free nodes (IPE position=None).",
            rich_help_panel=SEARCH,
        ),
    ] = True,
    root_position: Annotated[
        str | None,
        typer.Option(
            "--root-position",
            help="Position of the logits root: a token index, or a role (END, S2) when prompts of different lengths are aligned by role (default: last token).",
            rich_help_panel=SEARCH,
        ),
    ] = None,
    prompt_mode: Annotated[
        str,
        typer.Option(
            "--prompt-mode",
            help="batch: one search, metric averaged over prompts (IPE). per-prompt: one search per prompt, for cross-prompt statistics.",
            rich_help_panel=PROMPTS,
        ),
    ] = "batch",
    store: Annotated[
        str,
        typer.Option(
            "--store",
            help="all: every evaluated path (default); kept: only paths the pruning kept.",
            rich_help_panel=STORE,
        ),
    ] = "all",
    group_effects: Annotated[
        bool,
        typer.Option(
            "--group-effects/--no-group-effects",
            help="When the run completes, measure and store each receiver input's group effect and the refined order of the top edges (the default 'refined' edge rule of export and evaluate; on toy-ioi about 0.6 s and 1.4 s of masked forwards on the search prompts). Without it those use the 'effect' rule.",
            rich_help_panel=STORE,
        ),
    ] = True,
    db: Annotated[Path, DB_OPTION] = Path("pathdb.duckdb"),
    run_name: Annotated[str | None, RUN_NAME_OPTION] = None,
    replace: Annotated[bool, REPLACE_OPTION] = False,
    checkpoint_every: Annotated[
        float,
        typer.Option(
            "--checkpoint-every",
            help="Seconds between durable checkpoints (rows + frontier); an interrupted run resumes from the last one.",
            rich_help_panel=STORE,
        ),
    ] = 5.0,
    device: Annotated[
        str,
        typer.Option(
            "--device",
            help="Where the model, caches and metric run: cpu, cuda, cuda:N or auto (cuda when available, else cpu).",
        ),
    ] = "auto",
    dtype: Annotated[
        str,
        typer.Option(
            "--dtype",
            help="Model and engine precision: float32, bfloat16 (GPU speed mode; see BENCHMARKS.md for its error), float16 or float64. Scores are stored as float64 either way.",
        ),
    ] = "float32",
    threads: Annotated[
        int,
        typer.Option(
            "--threads",
            min=1,
            help="CPU threads for torch. The engine's operations are small: 1 is fastest on shared or loaded machines; try 2+ for large models on an idle machine.",
        ),
    ] = 1,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")] = False,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            help="Shard a per-prompt search over N Ray actors (each loads the model once; one per GPU on GPU nodes); this process stays the store's only writer. Needs pip install 'pathdb[distributed]'.",
            rich_help_panel=SEARCH,
        ),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address",
            help="With --workers: join the Ray cluster at this address (what `ray start --head` prints) instead of starting a local one.",
            rich_help_panel=SEARCH,
        ),
    ] = None,
    each: Annotated[
        bool,
        typer.Option(
            "--each",
            help="One run for each (-p, -m) pair of the repeated -p / -m, named [NAME/]PROMPTS/MODEL; with --workers all runs share one Ray pool.",
            rich_help_panel=SEARCH,
        ),
    ] = False,
) -> None:
    """Search backward from the logits and store [bold]every evaluated path[/] in the DuckDB file.

    Examples:

      pathdb search --run-name demo

      pathdb search -m toy-ioi --method attribution -t 0.2 --run-name attr

      pathdb search --strategy best-first --top-n 50 --batch-heads --run-name bf

      pathdb search --prompt-mode per-prompt -p toy-ioi-large --run-name per

      pathdb search --each -p toy-ioi-small -p toy-ioi-heldout -m toy-ioi -m toy-ioi-2l --workers 2 -n sets
    """
    from search.runner import CompletedInterrupted, RunInterrupted, SearchRequest, run_search
    from search.strategies import SearchParams

    check_one_prompt_source(prompts, prompt)
    params = SearchParams(
        strategy=strategy,  # type: ignore[arg-type]
        method=method,  # type: ignore[arg-type]
        min_contribution=min_contribution,
        include_negative=include_negative,
        top_n=top_n,
        max_time=max_time,
        max_width=max_width,
        max_queue=max_queue,
        batch_heads=batch_heads,
        batch_positions=batch_positions,
        split_kv=split_kv,
        max_depth=max_depth,
        recall=recall,
        partial_factor=partial_factor,
        max_paths=max_paths,
        checkpoint_every=checkpoint_every,
    )
    models, prompt_sets = model or ["toy-ioi"], prompts or [DEFAULT_PROMPTS]
    if not each:  # a repeated option overrides the earlier one, as before --each existed
        models, prompt_sets = models[-1:], prompt_sets[-1:]
    req = SearchRequest(
        model=models[0],
        prompts=None if prompt is not None else prompt_sets[0],
        clean=prompt,
        target=target,
        counterfactual=counterfactual,
        cf_target=cf_target,
        metric=metric,
        patch_type=patch,
        positional=positional,
        root_position=root_position,
        prompt_mode=prompt_mode,
        store_level=store,
        params=params,
        device=device,
        dtype=dtype,
        group_effects=group_effects,
    )
    if each:  # one run per (prompt set, model) pair
        from cli.search_many_cmd import search_many

        search_many(
            req,
            prompt_sets,
            models,
            db,
            run_name=run_name,
            replace=replace,
            quiet=quiet,
            threads=threads,
            workers=workers,
            ray_address=ray_address,
        )
        return
    try:
        res = run_search(
            req,
            db,
            run_name=run_name,
            replace=replace,
            quiet=quiet,
            threads=threads,
            workers=workers,
            ray_address=ray_address,
        )
    except CompletedInterrupted as e:
        _completed_interrupted(e)
    except RunInterrupted as e:
        err.print(
            f"[yellow]interrupted[/]: the run was saved at its last checkpoint; continue it with "
            f"`pathdb resume {e.run_name} --db {e.db}`",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(130) from None
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/] before the search started: nothing was stored")
        raise typer.Exit(130) from None
    _report(res)


def _completed_interrupted(e: RunInterrupted) -> NoReturn:
    """Report Ctrl-C after the run completed (its refined edge scores unmeasured) and exit 130."""
    err.print(
        f"[yellow]interrupted[/] after run {e.run_name!r} completed: it is stored in {e.db}; "
        "its edge scores use the group rule (`pathdb evaluate --edge-scores refined` measures the "
        "refined one)",
        highlight=False,
        soft_wrap=True,
    )
    raise typer.Exit(130) from None


def _report(res: RunResult) -> None:
    share = 100 * res.write_s / res.wall_s if res.wall_s else 0.0
    out.print(
        f"[green]run {res.name!r} (id {res.run_id}) {res.status}[/]: {res.n_evaluated:,} paths "
        f"evaluated, {res.n_complete:,} complete, {res.n_kept_complete:,} complete kept; "
        f"{res.wall_s:.1f} s ({share:.1f}% writing the store) -> {res.db}"
    )
    if res.stop_reason in ("max_time", "top_n"):
        why = "--max-time ran out" if res.stop_reason == "max_time" else "--top-n paths were found"
        out.print(
            f"[yellow]stopped early[/]: {why}, so the run is not exhaustive (stop_reason {res.stop_reason})"
        )
    if res.n_kept_complete == 0 and res.status == "completed":
        out.print(
            "[yellow]no complete path passed the pruning rule[/]: try a lower --min-contribution (or best-first: --strategy best-first --top-n 50)"
        )
    out.print(
        f"next: [bold]pathdb query paths {res.name}[/] | pathdb query signed {res.name} | pathdb show {res.name} -o circuit.svg"
    )


@app.command()
@friendly
def resume(
    run: Annotated[str, typer.Argument(help="Run id or name to continue.")],
    db: Annotated[Path, DB_OPTION] = Path("pathdb.duckdb"),
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")] = False,
    threads: Annotated[
        int,
        typer.Option(
            "--threads", min=1, help="CPU threads for torch (see `pathdb search --help`)."
        ),
    ] = 1,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            help="Search the prompts not yet written on N Ray actors (a per-prompt run; see `pathdb search --help`).",
        ),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address",
            help="With --workers: join the Ray cluster at this address instead of starting a local one.",
        ),
    ] = None,
) -> None:
    """Continue an interrupted run from its last checkpoint (same result as an uninterrupted run)."""
    from search.runner import CompletedInterrupted, RunInterrupted, resume_search

    if not db.exists():
        fail(f"no store at {db}: nothing to resume; pass the store with --db")
    _check_run_exists(run, db)
    try:
        res = resume_search(
            run, db, quiet=quiet, threads=threads, workers=workers, ray_address=ray_address
        )
    except CompletedInterrupted as e:
        _completed_interrupted(e)
    except RunInterrupted as e:
        err.print(
            f"[yellow]interrupted[/]: resume again with `pathdb resume {e.run_name} --db {e.db}`",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(130) from None
    except KeyboardInterrupt:
        err.print(
            f"[yellow]interrupted[/] before the run resumed: resume it with `pathdb resume {run} --db {db}`",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(130) from None
    _report(res)


def _check_run_exists(run: str, db: Path) -> None:
    """Refuse an unknown run before the store is opened for writing (so a typo changes nothing).

    A store whose schema needs an upgrade cannot be opened read-only; resume migrates it, so
    the check is left to resume itself then."""
    from pathdb.store.db import open_store
    from pathdb.store.errors import StoreError
    from pathdb.store.reader import get_run

    try:
        store = open_store(db, read_only=True)
    except StoreError:
        return
    with store:
        get_run(store, run)


@app.command()
@friendly
def runs(
    db: Annotated[Path, DB_OPTION] = Path("pathdb.duckdb"),
) -> None:
    """List the runs in the store: status, method, strategy, counts and timings."""
    from pathdb.evaluate.storage import RUNS_WITH_FAITHFULNESS
    from pathdb.store.db import open_store

    if not db.exists():
        err.print(f"[bold red]error:[/] no store at {db}: run `pathdb search` first, or pass --db")
        raise typer.Exit(2)
    with open_store(db, read_only=True) as store:
        rows = Rows.of(store.con.sql(RUNS_WITH_FAITHFULNESS))
    # columns that only some stores fill (edge runs, recall counts, evaluations) appear when filled
    edge_runs = "kind" in rows.columns and any(
        r[rows.columns.index("kind")] != "paths" for r in rows.rows
    )
    cols = [
        c
        for c in (
            "run_id",
            "name",
            "status",
            "stop_reason",
            "kind",
            "model_name",
            "method",
            "strategy",
            "metric",
            "prompt_mode",
            "n_evaluated",
            "n_complete",
            "n_kept",
            "n_pruned",
            "pruned_mass",
            "wall_s",
            "cpr",
            "cmd",
        )
        if c in rows.columns
        and (
            c not in ("cpr", "cmd", "n_pruned", "pruned_mass", "kind")
            or (rows.has_values(c) if c != "kind" else edge_runs)
        )
    ]
    if rows.empty:
        out.print(f"no runs in {db}")
        return
    show_rows(rows.select(cols), title=f"runs in {db}")


def main() -> None:
    """Console-script entry point (Ctrl-C before a run has started just stops, exit code 130).

    The process ends with ``os._exit`` after flushing: DuckDB 2.0's nanobind bindings print
    "nanobind: leaked ..." for duckdb's own module-level type constants when the interpreter tears
    down after SQLAlchemy and torch were loaded. Every store connection is closed by then (context
    managers), so skipping teardown loses nothing and keeps the output clean (and exits faster).
    """
    code: int | str | None = 0
    try:
        app()
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]")
        code = 130
    except SystemExit as e:
        code = e.code
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    main()
