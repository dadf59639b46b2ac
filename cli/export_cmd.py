"""``pathdb export`` (EAP-IG/MIB, networkx, DOT, tables) and ``pathdb show`` (circuit pictures)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cli.common import (
    DB_OPTION,
    FORCE_OPTION,
    STDOUT,
    check_suffix,
    describe_output,
    err,
    fail,
    friendly,
    output_file,
)
from cli.query_cmd import reader, warn_if_partial

if TYPE_CHECKING:
    from pathdb.store.effects import EdgeRule

FORMATS = {
    "eap-json": "EAP-IG / MIB circuit JSON (every real edge of the model, score + in_graph)",
    "eap-pt": "EAP-IG / MIB .pt (cfg, src_nodes, dst_nodes, edges_scores, edges_in_graph, nodes_in_graph)",
    "graphml": "networkx GraphML",
    "gexf": "networkx GEXF",
    "node-link": "networkx node-link JSON",
    "dot": "Graphviz DOT text",
    "html": "self-contained interactive circuit page (opens offline; --top-k sets the slider)",
    "parquet": "table (--what paths|edges|nodes)",
    "csv": "table (--what paths|edges|nodes)",
    "json": "table (--what paths|edges|nodes)",
}
SUFFIXES = {
    ".pt": "eap-pt", ".graphml": "graphml", ".gexf": "gexf", ".dot": "dot", ".gv": "dot",
    ".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".json": "eap-json",
    ".html": "html", ".htm": "html",
}  # fmt: skip
# Suffixes each format may be written under (the first is its canonical one).
FORMAT_SUFFIXES = {
    "eap-json": (".json",), "eap-pt": (".pt",), "graphml": (".graphml",), "gexf": (".gexf",),
    "node-link": (".json",), "dot": (".dot", ".gv"), "parquet": (".parquet", ".pq"),
    "csv": (".csv",), "json": (".json", ".jsonl"), "html": (".html", ".htm"),
}  # fmt: skip
BINARY_FORMATS = {"eap-pt", "parquet"}
SCORES = ("score", "abs_score", "pos_score", "neg_score")
EDGE_RULES = ("effect", "paths", "group", "refined")


@friendly
def export(
    run: Annotated[str, typer.Argument(help="Run id or name.")],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="File to write ('-': stdout, text formats with --format). An existing file needs --force.",
        ),
    ],
    fmt: Annotated[
        str | None,
        typer.Option(
            "--format",
            "-f",
            help="One of: "
            + ", ".join(FORMATS)
            + ". Default: from the file suffix (.json -> eap-json).",
        ),
    ] = None,
    db: Annotated[Path, DB_OPTION] = Path("pathdb.duckdb"),
    what: Annotated[
        str, typer.Option("--what", help="Table formats: paths, edges or nodes.")
    ] = "edges",
    top_k: Annotated[
        int | None,
        typer.Option(
            "--top-k",
            "-k",
            min=1,
            help="Edges in the circuit (in_graph) by |--score|; default all scored edges.",
        ),
    ] = None,
    threshold: Annotated[
        float | None,
        typer.Option("--threshold", help="Edges with |--score| >= this are in the circuit."),
    ] = None,
    score: Annotated[
        str,
        typer.Option(
            "--score",
            help="Edge score exported and ranked for in_graph: score (signed sum), abs_score, pos_score or neg_score.",
        ),
    ] = "score",
    edge_scores: Annotated[
        str | None,
        typer.Option(
            "--edge-scores",
            help="refined: group, each edge capped by its sender's widest input chain, the top 160 edges' order refined by masked forwards on the search prompts; group: every evaluated path on its first edge, then each receiver input's edges rescaled to sum to its group effect; effect: without the rescaling; paths: complete kept paths through the edge (the IPE/MIB path sum, as `query edges`). kv paths: half on <k>, half on <v>. The search stores what refined / group need (runs without: measured with the run's model). Default: the best rule the run stored (refined, else group, else effect) for position-free edges, else effect (what `pathdb evaluate` judges).",
        ),
    ] = None,
    positional: Annotated[
        bool,
        typer.Option(
            "--positional/--position-free",
            help="Graph formats: keep positions in node names. EAP-IG is always position-free.",
        ),
    ] = False,
    force: Annotated[bool, FORCE_OPTION] = False,
) -> None:
    """Export a run's circuit or tables to other tools (EAP-IG/MIB, networkx, Graphviz, Parquet/CSV/JSON)."""
    from pathdb import export as ex
    from pathdb.query import circuit, edges, nodes, top_paths

    if fmt is None and str(output) == STDOUT:
        fail(
            "-o - (stdout) needs --format; text formats: "
            + ", ".join(f for f in FORMATS if f not in BINARY_FORMATS)
        )
    f = fmt or SUFFIXES.get(output.suffix.lower()) or ""
    if f not in FORMATS:
        fail(
            f"unknown export format {fmt or output.suffix!r}; choose --format from: {', '.join(FORMATS)}"
        )
    if score not in SCORES:
        fail(f"--score must be one of {', '.join(SCORES)} (got {score!r})")
    if edge_scores is not None and edge_scores not in EDGE_RULES:
        fail(f"--edge-scores must be one of {', '.join(EDGE_RULES)} (got {edge_scores!r})")
    if what not in ("paths", "edges", "nodes"):
        fail(f"--what must be paths, edges or nodes (got {what!r})")
    check_suffix(output, f, FORMAT_SUFFIXES[f])
    free_edges = not positional and f != "html" and what == "edges"  # where the group rule applies
    if edge_scores in ("group", "refined") and not free_edges:
        fail(
            f"--edge-scores {edge_scores} scores position-free edges: drop --positional, and export edges (not html, --what paths|nodes)"
        )
    with reader(db) as con:
        (edge_scores, effects, refined), source = _edge_rule(con, run, edge_scores, free_edges)
        warn_if_partial(con, run, db)
        if f in ("parquet", "csv", "json"):
            if what == "paths":
                df = top_paths(con, run, k=10**9, complete=None)
            elif what == "edges":
                df = edges(con, run, positional=positional, rule=edge_scores, effects=effects,
                           refined=refined)  # fmt: skip
            else:
                df = nodes(con, run, positional=positional)
            if df.empty:
                fail(f"run {run} has no {what} to export (nothing written)")
            with output_file(
                output, force=force, suffix=FORMAT_SUFFIXES[f][0], text=f not in BINARY_FORMATS
            ) as path:
                ex.write_table(df, path, f)
            rule = f" (edge rule {edge_scores}{source})" if what == "edges" else ""
            err.print(f"wrote {len(df):,} {what} rows to {describe_output(output)}{rule}")
            return
        if f == "html":
            with output_file(output, force=force, suffix=".html") as path:
                ex.write_html(con, run, path, k=top_k or 30)
            err.print(
                f"wrote the interactive circuit of run {run} (opens offline) to {describe_output(output)}"
            )
            return
        c = circuit(
            con,
            run,
            top_k=top_k,
            threshold=threshold,
            positional=positional and not f.startswith("eap"),
            rule=edge_scores,
            score=score,
            effects=effects,
            refined=refined,
        )
    if c.edges.empty:
        fail(
            "the selection has 0 circuit edges (nothing written); raise --top-k or lower --threshold"
        )
    with output_file(
        output, force=force, suffix=FORMAT_SUFFIXES[f][0], text=f not in BINARY_FORMATS
    ) as path:
        if f == "eap-json":
            ex.to_eap_json(c, None, path, score=score)
        elif f == "eap-pt":
            ex.to_eap_pt(c, None, path, score=score)
        elif f == "dot":
            ex.write_dot(c, path, title=f"pathdb run {run}")
        else:
            ex.write_graph(ex.to_networkx(c), path, f)
    err.print(
        f"wrote {FORMATS[f]} ({len(c.edges):,} circuit edges; edge rule {edge_scores}{source}) "
        f"to {describe_output(output)}"
    )


def _edge_rule(con: Any, run: str, rule: str | None, free_edges: bool) -> tuple[EdgeRule, str]:
    """(edge rule with its inputs, where they came from) of an export: ``rule`` when given, else
    the run's default (:func:`pathdb.store.effects.default_edge_rule`) where it applies
    (``free_edges``), else ``effect``. Inputs the run did not store are measured with its model
    (loaded here) on its search prompts."""
    from pathdb.query.common import resolve_run
    from pathdb.store.effects import EdgeRule, default_edge_rule

    default = default_edge_rule(con, resolve_run(con, run).run_id)
    if rule is None:
        rule = default.rule if free_edges else "effect"
    if rule not in ("group", "refined"):
        return EdgeRule(rule), ""
    if default.effects and (rule == "group" or default.refined):  # stored: no torch import
        refined = default.refined if rule == "refined" else None
        return EdgeRule(rule, default.effects, refined), ": stored by the search"
    from pathdb.evaluate.groups import rule_inputs

    return rule_inputs(con, run, rule), ": measured with the model on the search prompts"


@friendly
def show(
    run: Annotated[str, typer.Argument(help="Run id or name.")],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="Picture file: .svg or .png ('-': SVG to stdout). An existing file needs --force.",
        ),
    ] = Path("circuit.svg"),
    db: Annotated[Path, DB_OPTION] = Path("pathdb.duckdb"),
    top_k: Annotated[
        int | None, typer.Option("--top-k", "-k", min=1, help="Edges drawn (largest |score|).")
    ] = 40,
    threshold: Annotated[
        float | None,
        typer.Option("--threshold", help="Draw edges with |score| >= this instead of top-k."),
    ] = None,
    sign: Annotated[
        str | None,
        typer.Option("--sign", help="Draw only the positive or the negative sub-circuit."),
    ] = None,
    positional: Annotated[
        bool,
        typer.Option(
            "--positional/--position-free",
            help="Lay nodes out by layer and position (positional) or by layer only.",
        ),
    ] = False,
    title: Annotated[str | None, typer.Option("--title", help="Picture title.")] = None,
    force: Annotated[bool, FORCE_OPTION] = False,
    faithfulness: Annotated[
        bool,
        typer.Option(
            "--faithfulness",
            help="Draw the run's stored faithfulness curves (`pathdb evaluate`) instead of its circuit.",
        ),
    ] = False,
    with_runs: Annotated[
        list[str] | None,
        typer.Option(
            "--with", help="--faithfulness: another run drawn on the same plot (repeatable)."
        ),
    ] = None,
) -> None:
    """Draw a run's circuit by layer: positive edges blue, negative red, width by |score|; or with
    --faithfulness its faithfulness curves (several runs with --with)."""
    if faithfulness:
        from cli.evaluate_cmd import draw_faithfulness

        return draw_faithfulness([run, *(with_runs or [])], output, db, force=force, title=title)
    from pathdb.query import circuit
    from pathdb.show import draw_circuit

    suffix = ".svg" if str(output) == STDOUT else output.suffix.lower()
    if suffix not in (".svg", ".png"):
        fail(f"{output}: the picture must be .svg or .png")
    with reader(db) as con:
        warn_if_partial(con, run, db)
        c = circuit(
            con,
            run,
            top_k=None if threshold is not None else top_k,
            threshold=threshold,
            positional=positional,
            sign=sign,
        )
    if c.edges.empty:
        fail("the selection has 0 edges (nothing drawn); raise --top-k or lower --threshold")
    with output_file(output, force=force, suffix=suffix, text=suffix == ".svg") as path:
        draw_circuit(c, path, positional=positional, title=title or f"pathdb run {run}")
    err.print(f"drew {len(c.edges):,} edges, {len(c.nodes):,} nodes to {describe_output(output)}")
