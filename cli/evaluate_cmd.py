"""``pathdb evaluate`` (faithfulness curves, CPR/CMD, stored) and ``pathdb compare`` (runs side by side)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cli.common import (
    DB_OPTION,
    FORCE_OPTION,
    describe_output,
    err,
    fail,
    friendly,
    out,
    output_file,
    show_frame,
)
from cli.query_cmd import reader, warn_if_partial

if TYPE_CHECKING:
    from pathdb.evaluate.results import Evaluation

RUNS = Annotated[list[str], typer.Argument(help="Run ids or names (see `pathdb runs`).")]
PLOT_SUFFIXES = (".svg", ".png")


def _counts(text: str | None) -> list[int]:
    """Parse ``--counts 50,75,100``."""
    if not text:
        return []
    try:
        counts = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        fail(f"--counts must be comma-separated edge counts such as 50,75,100 (got {text!r})")
    if any(c < 0 for c in counts):
        fail(f"--counts must be >= 0 (got {text!r})")
    return counts


def _plot_path(output: Path | None) -> None:
    """Refuse a plot file that is not .svg / .png before any work is done."""
    if output is not None and output.suffix.lower() not in PLOT_SUFFIXES:
        fail(f"{output}: the plot must be a .svg or .png file")


def _draw(evaluations: list[Evaluation], output: Path, force: bool, title: str | None) -> None:
    from pathdb.evaluate.plot import draw_curves

    with output_file(
        output, force=force, suffix=output.suffix.lower(), text=output.suffix.lower() == ".svg"
    ) as p:
        draw_curves(evaluations, p, title=title)
    err.print(
        f"drew the faithfulness curves of {len(evaluations)} run(s) to {describe_output(output)}"
    )


def _report(ev: Evaluation) -> None:
    """Print the MIB points of both rankings and the summary line (naming the edge rule judged)."""
    import pandas as pd

    rows: dict[float, dict[str, Any]] = {}
    for p in ev.points:
        if p.source == "mib" and p.fraction is not None:
            row = rows.setdefault(p.fraction, {"fraction": p.fraction, "k": p.k})
            row[f"{p.curve}_edges"] = p.n_edges
            row[f"{p.curve}_faithfulness"] = p.faithfulness
    table = pd.DataFrame(list(rows.values()))
    show_frame(
        table, title=f"faithfulness of run {ev.run_name!r} on {ev.prompts} ({ev.intervention})"
    )
    paths = ev.curve("paths")
    if paths:
        best = ", ".join(f"{p.k}: {p.faithfulness:.2f} ({p.n_edges} edges)" for p in paths[:6])
        out.print(f"top-k paths -> faithfulness: {best}{' ...' if len(paths) > 6 else ''}")
    e80 = "-" if ev.edges_80 is None else ev.edges_80
    e90 = "-" if ev.edges_90 is None else ev.edges_90
    column, rule = ev.edge_rule
    out.print(
        f"[green]run {ev.run_name!r}[/]: CPR {ev.cpr:.4f}, CMD {ev.cmd:.4f}, edges for 80% {e80}, "
        f"for 90% {e90} (of {ev.n_edges_total}); m(full) {ev.m_full:.4g}, m(empty) {ev.m_empty:.4g}; "
        f"{len(ev.points)} curve points in {ev.wall_s:.1f} s; evaluation {ev.evaluation_id}; "
        f"edge rule {rule} ({column})"
    )


@friendly
def evaluate(
    runs: RUNS,
    db: Annotated[Path, DB_OPTION] = Path("pathdb.duckdb"),
    prompts: Annotated[
        str | None,
        typer.Option(
            "--prompts",
            "-p",
            help="Evaluation prompt set (bundled name or JSONL file). Default: the bundled held-out set of a bundled search set (toy-ioi-heldout), else the run's own prompts (with a warning).",
        ),
    ] = None,
    intervention: Annotated[
        str | None,
        typer.Option(
            "--intervention",
            help="counterfactual, zero, mean (over every token) or mean-positional. Default: the run's --patch.",
        ),
    ] = None,
    score: Annotated[
        str,
        typer.Option(
            "--score",
            help="Edge score ranked: score (signed sum, the export's), abs_score, pos_score or neg_score.",
        ),
    ] = "score",
    counts: Annotated[
        str | None,
        typer.Option(
            "--counts", help="Extra circuit sizes (edges), comma-separated, e.g. 50,75,100."
        ),
    ] = None,
    paths: Annotated[
        bool,
        typer.Option(
            "--paths/--no-paths", help="Also the curve of circuits made of the top-k paths."
        ),
    ] = True,
    edge_scores: Annotated[
        str | None,
        typer.Option(
            "--edge-scores",
            help="refined: group, capped by each sender's widest input chain, the top edges' order refined by masked forwards on the search prompts; group: every evaluated path on its first edge, then each receiver input's edges rescaled to sum to its group effect; effect: without the rescaling. The search stores what refined / group need (runs without: measured with the model on the search prompts). Default (as export): refined, else group, else effect, as the run stored; effect for --positional (docs/semantics.md).",
        ),
    ] = None,
    scan_step: Annotated[
        int,
        typer.Option(
            "--scan-step",
            min=1,
            help="Resolution (edges) of the bisection that finds the edges needed for 80% / 90%.",
        ),
    ] = 5,
    positional: Annotated[
        bool,
        typer.Option(
            "--positional",
            help="Positional circuits of a positional path run: edges between (node, position) pairs, masked per position. Default prompts: the run's own (same length).",
        ),
    ] = False,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Also draw the curves to this .svg / .png file."),
    ] = None,
    force: Annotated[bool, FORCE_OPTION] = False,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto.")] = "auto",
    threads: Annotated[int, typer.Option("--threads", min=1, help="CPU threads for torch.")] = 1,
) -> None:
    """Faithfulness of each run's circuits (MIB): curves over edge counts, CPR, CMD, edges for 80% / 90%; stored in the DuckDB file.

    Examples:

      pathdb evaluate demo

      pathdb evaluate demo -p my-heldout.jsonl --counts 50,75,100 -o curve.png

      pathdb evaluate demo --positional
    """
    from pathdb.evaluate.curves import EVAL_RULES
    from pathdb.evaluate.results import INTERVENTIONS, SCORES
    from pathdb.evaluate.session import positional_length
    from pathdb.query.common import resolve_run
    from pathdb.store.db import open_store

    if score not in SCORES:
        fail(f"--score must be one of {', '.join(SCORES)} (got {score!r})")
    if intervention is not None and intervention not in INTERVENTIONS:
        fail(f"--intervention must be one of {', '.join(INTERVENTIONS)} (got {intervention!r})")
    if edge_scores is not None and edge_scores not in EVAL_RULES:
        fail(f"--edge-scores must be one of {', '.join(EVAL_RULES)} (got {edge_scores!r})")
    if positional and edge_scores in ("group", "refined"):
        fail(
            f"--edge-scores {edge_scores} is position-free; drop --positional or use --edge-scores effect"
        )
    extra = _counts(counts)
    _plot_path(output)
    if output is not None and output.exists() and not force:
        fail(f"{output} already exists; pass --force to overwrite it, or choose another -o file")
    if not db.exists():
        fail(f"no store at {db}: run `pathdb search` first, or pass --db PATH")
    open_store(db, create=False).close()  # migrate an older store before the read-only work
    with reader(db) as con:
        for run in runs:  # unknown runs (and --positional on other runs) fail before loading
            resolve_run(con, run)
            if positional:
                positional_length(con, run)

    import torch

    from pathdb.evaluate.curves import evaluate_run
    from pathdb.evaluate.session import setup
    from pathdb.evaluate.storage import save_evaluation

    torch.set_num_threads(threads)
    done: list[Evaluation] = []
    for run in runs:
        with reader(db) as con:
            warn_if_partial(con, run, db)
            s = setup(con, run, prompts=prompts, intervention=intervention, device=device,
                      positional=positional)  # fmt: skip
            if s.warning:
                err.print(f"[yellow]warning[/]: {s.warning}", highlight=False, soft_wrap=True)
            ev = evaluate_run(con, run, s.evaluator, prompts=s.prompts, heldout=s.heldout, score=score,
                              counts=extra, paths=paths, scan_step=scan_step, rule=edge_scores)  # fmt: skip
        with open_store(db) as store:
            save_evaluation(store.con, ev)
        _report(ev)
        done.append(ev)
    if output is not None:
        _draw(done, output, force, None)


def draw_faithfulness(
    runs: list[str], output: Path, db: Path, *, force: bool, title: str | None
) -> None:
    """``pathdb show RUN --faithfulness``: the stored curves of ``runs`` on one plot."""
    from pathdb.evaluate.storage import require_evaluation

    _plot_path(output)
    with reader(db) as con:
        evaluations = [require_evaluation(con, r, db) for r in runs]
    _draw(evaluations, output, force, title)


@friendly
def compare(
    runs: RUNS,
    db: Annotated[Path, DB_OPTION] = Path("pathdb.duckdb"),
    top_k: Annotated[
        int,
        typer.Option(
            "--top-k",
            "-k",
            min=1,
            help="Edges (by |score|) whose overlap the Jaccard index measures.",
        ),
    ] = 50,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Draw every run's curves on one .svg / .png plot."),
    ] = None,
    force: Annotated[bool, FORCE_OPTION] = False,
) -> None:
    """Compare runs: CPR, CMD, edges for 80% / 90%, search time; top-k edge overlap and rank correlation.

    Uses each run's latest stored evaluation (`pathdb evaluate RUN` makes one).
    """
    if len(runs) < 2:
        fail("compare needs at least two runs, e.g. `pathdb compare exact attr`")
    from pathdb.evaluate.compare import agreement, summary
    from pathdb.evaluate.storage import require_evaluation

    _plot_path(output)
    if output is not None and output.exists() and not force:
        fail(f"{output} already exists; pass --force to overwrite it, or choose another -o file")
    with reader(db) as con:
        evaluations = [require_evaluation(con, r, db) for r in runs]
        table = summary(con, evaluations)
        pairs = agreement(con, runs, top_k=top_k)
    settings = {(e.prompts, e.intervention, e.metric, e.score) for e in evaluations}
    if len(settings) > 1:
        err.print(
            "[yellow]warning[/]: the runs' latest evaluations used different prompts, interventions, "
            "metrics or scores; re-run `pathdb evaluate` with the same options to compare like with like",
            highlight=False,
        )
    show_frame(table, title="faithfulness (latest evaluation of each run)")
    show_frame(pairs, title=f"agreement: top-{top_k} edge overlap and edge-score rank correlation")
    if output is not None:
        _draw(
            evaluations,
            output,
            force,
            "faithfulness: " + ", ".join(e.run_name for e in evaluations),
        )
