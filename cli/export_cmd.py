"""``pathdb export`` (EAP-IG/MIB, networkx, DOT, tables) and ``pathdb show`` (circuit pictures)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import DB_OPTION, err, fail, friendly
from cli.query_cmd import reader, run_ref

FORMATS = {
    "eap-json": "EAP-IG / MIB circuit JSON (every real edge of the model, score + in_graph)",
    "eap-pt": "EAP-IG / MIB .pt (cfg, src_nodes, dst_nodes, edges_scores, edges_in_graph, nodes_in_graph)",
    "graphml": "networkx GraphML",
    "gexf": "networkx GEXF",
    "node-link": "networkx node-link JSON",
    "dot": "Graphviz DOT text",
    "parquet": "table (--what paths|edges|nodes)",
    "csv": "table (--what paths|edges|nodes)",
    "json": "table (--what paths|edges|nodes)",
}
SUFFIXES = {
    ".pt": "eap-pt", ".graphml": "graphml", ".gexf": "gexf", ".dot": "dot", ".gv": "dot",
    ".parquet": "parquet", ".csv": "csv", ".json": "eap-json",
}  # fmt: skip


@friendly
def export(
    run: Annotated[str, typer.Argument(help="Run id or name.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="File to write.")],
    fmt: Annotated[str | None, typer.Option("--format", "-f", help="One of: " + ", ".join(FORMATS) + ". Default: from the file suffix (.json -> eap-json).")] = None,
    db: Annotated[Path, DB_OPTION] = Path("pathdb.duckdb"),
    what: Annotated[str, typer.Option("--what", help="Table formats: paths, edges or nodes.")] = "edges",
    top_k: Annotated[int | None, typer.Option("--top-k", "-k", help="Edges in the circuit (in_graph) by |score|; default all scored edges.")] = None,
    threshold: Annotated[float | None, typer.Option("--threshold", help="Edges with score >= this are in the circuit.")] = None,
    score: Annotated[str, typer.Option("--score", help="Edge score exported: score (signed sum, the IPE/MIB convention), abs_score, pos_score or neg_score.")] = "score",
    positional: Annotated[bool, typer.Option("--positional/--position-free", help="Graph formats: keep positions in node names. EAP-IG is always position-free.")] = False,
) -> None:
    """Export a run's circuit or tables to other tools (EAP-IG/MIB, networkx, Graphviz, Parquet/CSV/JSON)."""
    from pathdb import export as ex
    from pathdb.query import circuit, edges, nodes, top_paths

    f = fmt or SUFFIXES.get(output.suffix.lower()) or ""
    if f not in FORMATS:
        fail(f"unknown export format {fmt or output.suffix!r}; choose --format from: {', '.join(FORMATS)}")
    with reader(db) as con:
        ref = run_ref(run)
        if f in ("parquet", "csv", "json"):
            if what == "paths":
                df = top_paths(con, ref, k=10**9, complete=None)
            elif what == "edges":
                df = edges(con, ref, positional=positional)
            elif what == "nodes":
                df = nodes(con, ref, positional=positional)
            else:
                fail(f"--what must be paths, edges or nodes (got {what!r})")
            path = ex.write_table(df, output, f)
            err.print(f"wrote {len(df):,} {what} rows to {path}")
            return
        c = circuit(con, ref, top_k=top_k, threshold=threshold, positional=positional and not f.startswith("eap"))
    if f == "eap-json":
        path = ex.to_eap_json(c, None, output, score=score)
    elif f == "eap-pt":
        path = ex.to_eap_pt(c, None, output, score=score)
    elif f == "dot":
        path = ex.write_dot(c, output, title=f"pathdb run {run}")
    else:
        path = ex.write_graph(ex.to_networkx(c), output, f)
    err.print(f"wrote {FORMATS[f]} ({len(c.edges):,} circuit edges) to {path}")


@friendly
def show(
    run: Annotated[str, typer.Argument(help="Run id or name.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Picture file: .svg or .png.")] = Path("circuit.svg"),
    db: Annotated[Path, DB_OPTION] = Path("pathdb.duckdb"),
    top_k: Annotated[int | None, typer.Option("--top-k", "-k", help="Edges drawn (largest |score|).")] = 40,
    threshold: Annotated[float | None, typer.Option("--threshold", help="Draw edges with |score| >= this instead of top-k.")] = None,
    sign: Annotated[str | None, typer.Option("--sign", help="Draw only the positive or the negative sub-circuit.")] = None,
    positional: Annotated[bool, typer.Option("--positional/--position-free", help="Lay nodes out by layer and position (positional) or by layer only.")] = False,
    title: Annotated[str | None, typer.Option("--title", help="Picture title.")] = None,
) -> None:
    """Draw a run's circuit by layer: positive edges blue, negative red, width by |score|."""
    from pathdb.query import circuit
    from pathdb.show import draw_circuit

    if output.suffix.lower() not in (".svg", ".png"):
        fail(f"{output}: the picture must be .svg or .png")
    with reader(db) as con:
        c = circuit(con, run_ref(run), top_k=None if threshold is not None else top_k, threshold=threshold, positional=positional, sign=sign)
    path = draw_circuit(c, output, positional=positional, title=title or f"pathdb run {run}")
    err.print(f"drew {len(c.edges):,} edges, {len(c.nodes):,} nodes to {path}")
