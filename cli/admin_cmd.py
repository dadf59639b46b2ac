"""``pathdb models``, ``pathdb db`` and ``pathdb prompts``: what is available, store upkeep, prompt checks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import DB_OPTION, FORCE_OPTION, err, fail, friendly, out, show_frame

models_app = typer.Typer(
    help="Models pathdb can load (bundled toys work offline).", invoke_without_command=True
)
db_app = typer.Typer(help="Inspect and upgrade the DuckDB store.", no_args_is_help=True)
prompts_app = typer.Typer(
    help="Bundled prompt sets and prompt-file validation.", no_args_is_help=True
)


@models_app.callback()
@friendly
def models(ctx: typer.Context) -> None:
    """List bundled toy models (offline) and how to load real ones."""
    if ctx.invoked_subcommand is not None:
        return
    import pandas as pd

    from pathdb.models import list_models

    infos = list_models()
    df = pd.DataFrame([vars(i) if not hasattr(i, "_asdict") else i._asdict() for i in infos])
    show_frame(df, title="available models")
    out.print(
        "Also: any TransformerLens name (e.g. gpt2-small; needs network or a Hugging Face cache) "
        "or a local Hugging Face checkpoint directory: pathdb search -m ./my-gpt2"
    )


@models_app.command("train")
@friendly
def train(
    name: Annotated[str, typer.Argument(help="toy-ioi, toy-ioi-2l or toy-ioi-llama.")] = "toy-ioi",
    out_dir: Annotated[
        Path,
        typer.Option(
            "--out", help="Directory for the weights, config, tokenizer and training.json."
        ),
    ] = Path("trained-toy"),
    seed: Annotated[int, typer.Option("--seed")] = 0,
    force: Annotated[bool, FORCE_OPTION] = False,
) -> None:
    """Re-train a bundled toy model from scratch (deterministic for a seed; minutes on a CPU)."""
    import os

    from pathdb.models.train import TOY_SPECS, train_toy

    if name not in TOY_SPECS:
        fail(f"unknown toy model {name!r}; choose one of {', '.join(sorted(TOY_SPECS))}")
    if out_dir.exists() and not out_dir.is_dir():
        fail(f"--out {out_dir} is a file, not a directory; choose another --out")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        fail(
            f"--out {out_dir} already exists and is not empty; pass --force to overwrite its files, or choose another --out"
        )
    parent = out_dir if out_dir.is_dir() else out_dir.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        fail(f"cannot write to {parent}; choose a writable --out directory")
    metrics = train_toy(name, out_dir, seed=seed)
    out.print(metrics)


@db_app.command("info")
@friendly
def info(db: Annotated[Path, DB_OPTION] = Path("pathdb.duckdb")) -> None:
    """Schema revision, size and per-run counts of a store."""
    from pathdb.store.db import open_store

    if not db.exists():
        fail(f"no store at {db}")
    with open_store(db, read_only=True) as store:
        d = store.info()
    runs = d.pop("runs", None)
    for k, v in d.items():
        out.print(f"[bold]{k}[/]: {v}")
    if runs:
        import pandas as pd

        show_frame(pd.DataFrame(runs), title="runs")


@db_app.command("upgrade")
@friendly
def upgrade(db: Annotated[Path, DB_OPTION] = Path("pathdb.duckdb")) -> None:
    """Migrate a store written by an older pathdb to this version's schema."""
    from pathdb.store.db import upgrade as do_upgrade

    if not db.exists():
        fail(f"no store at {db}; pass the store to upgrade with --db FILE")
    before, after = do_upgrade(db)
    out.print(f"{db}: schema {before or 'empty'} -> {after}")


@prompts_app.command("check")
@friendly
def check(
    file: Annotated[str, typer.Argument(help="Prompt JSONL file or bundled set name.")],
    model: Annotated[
        str, typer.Option("--model", "-m", help="Model whose tokenizer is used.")
    ] = "toy-ioi",
) -> None:
    """Validate a prompt file against a model's tokenizer; errors name the line and field.

    Also says how a positional batch search will align the prompts: token indices (one length),
    role positions (several lengths, role labels), or not at all (several lengths, no roles)."""
    from pathdb.models import load
    from pathdb.prompts import load_prompts

    ps = load_prompts(file, load(model))
    lengths = sorted({int(n) for n in ps.lengths})
    if len(lengths) == 1:
        how = f"{lengths[0]} tokens each; positional searches use token indices"
    elif ps.has_roles:
        axis = ps.position_axis()
        how = (
            f"{lengths[0]}-{lengths[-1]} tokens; positional batch searches align them by role "
            f"({len(axis)} role positions, {len(axis.groups())} layouts)"
        )
    else:
        how = (
            f"{lengths[0]}-{lengths[-1]} tokens, no role labels; batch searches need --no-positional "
            "(or add roles)"
        )
    out.print(f"[green]ok[/]: {len(ps.records)} prompts, {how}")


@prompts_app.command("list")
def list_sets() -> None:
    """Bundled prompt sets."""
    from importlib.resources import files

    for f in sorted(files("pathdb.data").joinpath("prompts").iterdir(), key=lambda p: p.name):
        if f.name.endswith(".jsonl"):
            n = sum(1 for line in f.read_text().splitlines() if line.strip())
            out.print(f"{f.name[:-6]}: {n} prompts")
    err.print("use with: pathdb search -p NAME")
