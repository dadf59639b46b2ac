"""``pathdb attribute``: EAP, EAP-IG, AtP*, exact edge patching and learned edge masks, stored
as edge-score runs beside the path searches (same model / prompt / metric / patch options)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import (
    DB_OPTION,
    PROMPT_OPTION,
    PROMPTS,
    REPLACE_OPTION,
    RUN_NAME_OPTION,
    check_one_prompt_source,
    err,
    fail,
    friendly,
    out,
)

METHOD = "Method"


@friendly
def attribute(
    method: Annotated[
        str,
        typer.Option(
            "--method",
            help="eap (edge attribution patching), eap-ig (integrated gradients on the inputs), atp* (AtP with QK fix and GradDrop; node and edge scores), edge-patching (exact: one masked forward per edge) or learned-mask (learned edge coefficients with a sparsity penalty).",
            rich_help_panel=METHOD,
        ),
    ] = "eap",
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            help="Bundled toy name, TransformerLens name or local checkpoint (as `pathdb search`). Any architecture the engine supports (Gemma-2's post-sublayer norms included).",
            rich_help_panel=METHOD,
        ),
    ] = "toy-ioi",
    prompts: Annotated[
        str | None,
        typer.Option(
            "--prompts",
            "-p",
            help="Bundled prompt set name or a JSONL file. Default: toy-ioi-small.",
            rich_help_panel=PROMPTS,
        ),
    ] = None,
    prompt: Annotated[str | None, PROMPT_OPTION] = None,
    target: Annotated[
        str | None,
        typer.Option("--target", help="Target token for --prompt.", rich_help_panel=PROMPTS),
    ] = None,
    counterfactual: Annotated[
        str | None,
        typer.Option(
            "--counterfactual", help="Counterfactual prompt for --prompt.", rich_help_panel=PROMPTS
        ),
    ] = None,
    cf_target: Annotated[
        str | None,
        typer.Option(
            "--cf-target", help="Counterfactual target token for --prompt.", rich_help_panel=PROMPTS
        ),
    ] = None,
    metric: Annotated[
        str,
        typer.Option(
            "--metric",
            help="logit-diff, target-logit-pct, target-prob-pct, kl, indirect-effect.",
            rich_help_panel=METHOD,
        ),
    ] = "logit-diff",
    patch: Annotated[
        str,
        typer.Option(
            "--patch",
            help="Corruption of an edge's message: counterfactual (the counterfactual prompt's), zero, or mean (over prompts, per position).",
            rich_help_panel=METHOD,
        ),
    ] = "counterfactual",
    ig_steps: Annotated[
        int | None,
        typer.Option(
            "--ig-steps",
            help="eap-ig: integration steps (default 5; 1 step is eap).",
            rich_help_panel=METHOD,
        ),
    ] = None,
    qk_fix: Annotated[
        bool | None,
        typer.Option(
            "--qk-fix/--no-qk-fix",
            help="atp*: recompute the attention softmax for query/key effects (default on).",
            rich_help_panel=METHOD,
        ),
    ] = None,
    grad_drop: Annotated[
        bool | None,
        typer.Option(
            "--grad-drop/--no-grad-drop",
            help="atp*: GradDrop (scores become magnitudes; default on).",
            rich_help_panel=METHOD,
        ),
    ] = None,
    penalty: Annotated[
        list[float] | None,
        typer.Option(
            "--penalty",
            help="learned-mask: sparsity penalty (default 0.1); repeat for a sweep, one run per penalty named RUN-p<penalty>.",
            rich_help_panel=METHOD,
        ),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(
            "--steps", help="learned-mask: gradient steps (default 100).", rich_help_panel=METHOD
        ),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(
            "--lr", help="learned-mask: Adam learning rate (default 0.1).", rich_help_panel=METHOD
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            "--seed",
            help="learned-mask: seed of the initial noise (default 0; same seed, same mask).",
            rich_help_panel=METHOD,
        ),
    ] = None,
    db: Annotated[Path, DB_OPTION] = Path("pathdb.duckdb"),
    run_name: Annotated[str | None, RUN_NAME_OPTION] = None,
    replace: Annotated[bool, REPLACE_OPTION] = False,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto.")] = "auto",
    dtype: Annotated[
        str, typer.Option("--dtype", help="float32, bfloat16, float16 or float64.")
    ] = "float32",
    threads: Annotated[int, typer.Option("--threads", min=1, help="CPU threads for torch.")] = 1,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")] = False,
) -> None:
    """Score every edge of the position-free graph with another attribution method and store it
    as an [bold]edge run[/]: query, export, show, evaluate and compare it like a path run.

    Examples:

      pathdb attribute --method eap --run-name eap

      pathdb attribute --method eap-ig --ig-steps 10 --run-name eap-ig

      pathdb attribute --method learned-mask --penalty 0.05 --penalty 0.2 --run-name lm
    """
    from rich.progress import Progress

    from pathdb.methods import option_problem

    check_one_prompt_source(prompts, prompt)
    options = {"ig_steps": ig_steps, "qk_fix": qk_fix, "grad_drop": grad_drop, "penalties": penalty or None,
               "steps": steps, "lr": lr, "seed": seed}  # fmt: skip
    problem = option_problem(method, options)
    if problem is not None:  # before torch is imported: a typo costs no model load
        fail(problem)
    from search.methods.run import AttributeRequest
    from search.methods.run import attribute as run_attribute

    req = AttributeRequest(
        method=method, model=model, prompts=None if prompt is not None else (prompts or "toy-ioi-small"),
        clean=prompt, target=target, counterfactual=counterfactual, cf_target=cf_target, metric=metric,
        patch_type=patch, device=device, dtype=dtype, options={k: v for k, v in options.items() if v is not None},
    )  # fmt: skip
    with Progress(console=err, transient=True, disable=quiet or not err.is_terminal) as bar:
        tasks: dict[str, int] = {}

        def progress(what: str, done: int, total: int) -> None:
            if what not in tasks:
                tasks[what] = int(bar.add_task(f"{method} {what}", total=total))
            bar.update(tasks[what], completed=done)  # type: ignore[arg-type]

        try:
            runs = run_attribute(
                req, db, run_name=run_name, replace=replace, threads=threads, progress=progress
            )
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]: nothing was stored")
            raise typer.Exit(130) from None
    for r in runs:
        extra = (
            f", {r.info['n_edges_kept']} edges kept (penalty {r.info['penalty']:g})"
            if "n_edges_kept" in r.info
            else ""
        )
        out.print(
            f"[green]run {r.name!r} (id {r.run_id}) completed[/]: {r.method}, {r.n_edges:,} edges scored{extra}; {r.wall_s:.1f} s -> {db}"
        )
    first = runs[0].name
    out.print(
        f"next: [bold]pathdb query edges {first}[/] | pathdb evaluate {first} | pathdb compare {first} OTHER_RUN"
    )
