"""The seed documents' attribution methods against pathdb's path searches on ``toy-ioi`` and
``toy-ioi-llama``: CPR, CMD, edges for 80% / 90% faithfulness and wall time, judged as
``pathdb evaluate`` / ``pathdb compare``.

Every configuration scores ``--model`` (default ``toy-ioi``) on ``toy-ioi-small`` (counterfactual
patching, logit difference) into one store per model (``--db``) -- the methods through ``search.methods.run.attribute`` (the
code of ``pathdb attribute``), the path searches through ``run_loaded`` (``pathdb search``;
positional, ``-t 0.05``) -- then evaluates the run on the bundled held-out set ``toy-ioi-heldout``
exactly as ``pathdb evaluate RUN`` and stores the evaluation; ``compare`` reports what
``pathdb compare`` does over every run of the store (latest evaluations, top-50 Jaccard, Spearman);
``plot`` draws every evaluated run's top-n |score| curve (CMD) of the store into
``benchmarks/results/methods-MODEL.png``. Usage (each configuration stays around a minute on a loaded 2-core machine)::

    python benchmarks/bench_methods.py --configs eap,eap-ig,atp*,edge-patching
    python benchmarks/bench_methods.py --configs learned-mask-p0.02,learned-mask-p0.1
    python benchmarks/bench_methods.py --configs exact,attribution,hybrid
    python benchmarks/bench_methods.py --configs compare
    python benchmarks/bench_methods.py --configs compare,plot
    python benchmarks/bench_methods.py --model toy-ioi-llama --configs eap,eap-ig,atp*
    python benchmarks/bench_methods.py --configs gpt2-shape:eap   # seconds on a random GPT-2 small
    python benchmarks/bench_methods.py --configs llama-shape:eap --shape-layers 4  # random Llama-3 shape

Rows are merged into ``benchmarks/results/methods.json`` by model and configuration name.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from pathdb.evaluate.compare import agreement, summary
from pathdb.evaluate.curves import evaluate_run
from pathdb.evaluate.plot import draw_curves
from pathdb.evaluate.results import Evaluation
from pathdb.evaluate.session import setup
from pathdb.evaluate.storage import latest_evaluation, save_evaluation
from pathdb.models import load
from pathdb.prompts import load_prompts
from pathdb.store.db import open_store
from search import SearchParams, SearchRequest, run_loaded
from search.methods.run import AttributeRequest, attribute

METHODS: dict[str, dict[str, Any]] = {
    "eap": {"method": "eap"},
    "eap-ig": {"method": "eap-ig", "options": {"ig_steps": 5}},
    "atp*": {"method": "atp*"},
    "atp-qk": {"method": "atp*", "options": {"grad_drop": False}},
    "edge-patching": {"method": "edge-patching"},
    "learned-mask-p0.02": {"method": "learned-mask", "options": {"penalties": [0.02], "steps": 60}},
    "learned-mask-p0.1": {"method": "learned-mask", "options": {"penalties": [0.1], "steps": 60}},
}
SEARCHES = ("exact", "attribution", "hybrid")
RESULTS = Path(__file__).parent / "results" / "methods.json"
MODELS = ("toy-ioi", "toy-ioi-llama")


def score(name: str, db: Path, model_name: str, model: Any, prompts: Any) -> float:
    """Store configuration ``name`` as run ``name`` (replacing it); its wall seconds."""
    if name in SEARCHES:
        params = SearchParams(method=name, min_contribution=0.05)  # type: ignore[arg-type]
        req = SearchRequest(model=model_name, params=params)
        return float(
            run_loaded(req, model, prompts, db, run_name=name, quiet=True, replace=True).wall_s
        )
    spec = METHODS[name]
    areq = AttributeRequest(
        method=spec["method"], model=model_name, device="cpu", options=dict(spec.get("options", {}))
    )
    return float(attribute(areq, db, run_name=name, replace=True)[0].wall_s)


def run_config(name: str, db: Path, model_name: str, model: Any, prompts: Any) -> dict[str, Any]:
    """Score, evaluate on toy-ioi-heldout (stored), and return the row."""
    wall = score(name, db, model_name, model, prompts)
    with open_store(db) as store:
        s = setup(store.con, name, model=model)
        t0 = time.perf_counter()
        ev = evaluate_run(store.con, name, s.evaluator, prompts=s.prompts, heldout=s.heldout)
        save_evaluation(store.con, ev)
        kind = store.con.execute("SELECT kind FROM runs WHERE name = ?", [name]).fetchall()[0][0]
        kept = store.con.execute(
            "SELECT count(*) FILTER (WHERE in_graph) FROM edge_scores JOIN runs USING (run_id) WHERE name = ?",
            [name],
        ).fetchall()[0][0]
    return {
        "model": model_name, "config": name, "kind": kind, "wall_s": round(wall, 2), "cpr": round(ev.cpr, 4),
        "cmd": round(ev.cmd, 4), "edges_80": ev.edges_80, "edges_90": ev.edges_90,
        "n_edges_total": ev.n_edges_total, "learned_circuit_edges": kept or None,
        "eval_s": round(time.perf_counter() - t0, 2),
    }  # fmt: skip


class _RandomPrompts:
    """Random token prompts in the shape :class:`MaskedEvaluator` reads (timing only)."""

    def __init__(self, vocab: int, batch: int, seq: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.clean_tokens = torch.randint(0, vocab, (batch, seq), generator=g)
        self.cf_tokens = torch.randint(0, vocab, (batch, seq), generator=g)
        self.target_ids = torch.randint(0, vocab, (batch,), generator=g)
        self.cf_target_ids = torch.randint(0, vocab, (batch,), generator=g)
        self.lengths = torch.full((batch,), seq)
        self.source = f"{batch} random prompts of {seq} tokens"

    def __len__(self) -> int:
        return int(self.clean_tokens.shape[0])


SHAPE_METHODS = ("eap", "eap-ig", "atp-qk", "atp*", "learned-mask")
SHAPE_VOCAB = 1000  # the vocabulary of both shapes when cut to --shape-layers (as bench_arch.py)


def shape_model(shape: str, layers: int | None) -> Any:
    """A seeded random model: ``gpt2-shape`` (12L/12H/d768/d_mlp 3072; with ``layers``, that many
    layers and a 1000-token vocabulary, else 12 layers and GPT-2's 50,257) or ``llama-shape``
    (bench_arch.py's Llama-3 shape: GQA 16/4, d2048, d_head 128, SwiGLU 8192, RMSNorm, rotary;
    ``layers`` layers, default 4, 1000-token vocabulary)."""
    from bench_arch import llama_model
    from bench_engine import random_model
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    if shape == "llama-shape":
        return llama_model(layers or 4)
    if layers is not None:
        return random_model(layers, 12, 768, 3072, SHAPE_VOCAB)
    cfg = HookedTransformerConfig(
        n_layers=12, n_heads=12, d_model=768, d_head=64, d_mlp=3072, d_vocab=50257, n_ctx=64,
        act_fn="gelu_new", normalization_type="LN", positional_embedding_type="standard", seed=0,
    )  # fmt: skip
    return HookedTransformer(cfg).eval()


def shape_timing(
    shape: str, method: str, layers: int | None, batch: int = 4, seq: int = 15
) -> dict[str, Any]:
    """Seconds of one method on a random model of ``shape`` (:func:`shape_model`): ``eap-ig`` 5
    steps, learned-mask per Adam step (edge-patching needs one masked forward per edge and is not
    timed)."""
    from pathdb.evaluate.masked import MaskedEvaluator
    from search.methods.atp_star import atp_star
    from search.methods.eap import eap
    from search.methods.eap_ig import eap_ig
    from search.methods.learned_mask import learned_mask

    if shape == "llama-shape":
        layers = layers or 4
    model = shape_model(shape, layers)
    cfg = model.cfg
    prompts: Any = _RandomPrompts(cfg.d_vocab, batch, seq)
    ev = MaskedEvaluator(model, prompts, "logit_difference", "counterfactual")
    runs = {
        "eap": lambda: eap(ev),
        "eap-ig": lambda: eap_ig(ev, 5),
        "atp-qk": lambda: atp_star(ev, grad_drop=False),
        "atp*": lambda: atp_star(ev),
        "learned-mask": lambda: learned_mask(ev, penalty=0.1, steps=2),
    }
    t0 = time.perf_counter()
    runs[method]()
    seconds = (time.perf_counter() - t0) / (2 if method == "learned-mask" else 1)
    heads = f"{cfg.n_heads}H" + (f"/{cfg.n_key_value_heads}KV" if cfg.n_key_value_heads else "")
    return {"config": f"{shape}{f'-{layers}l' if layers else ''}:{method}", "prompts": prompts.source,
            "shape": f"{cfg.n_layers}L/{heads}/d{cfg.d_model}/d_head {cfg.d_head}/d_mlp {cfg.d_mlp}"
                     f"{' gated' if cfg.gated_mlp else ''}/vocab {cfg.d_vocab}",
            "n_edges": ev.graph.n_edges, "seconds": round(seconds, 2)}  # fmt: skip


def _evaluated(con: Any) -> list[Evaluation]:
    """The latest evaluation of every evaluated run of the store, in run order."""
    names = [r[0] for r in con.execute("SELECT name FROM runs ORDER BY run_id").fetchall()]
    evs = [latest_evaluation(con, n) for n in names]
    return [e for e in evs if e is not None]


def compare(db: Path, model_name: str) -> dict[str, Any]:
    """What ``pathdb compare`` reports over every evaluated run of the store."""
    with open_store(db, read_only=True) as store:
        evs = _evaluated(store.con)
        table = summary(store.con, evs)
        pairs = agreement(store.con, [e.run_name for e in evs], top_k=50)
    return {"model": model_name, "config": "compare", "summary": json.loads(table.to_json(orient="records")),
            "agreement": json.loads(pairs.round(4).to_json(orient="records"))}  # fmt: skip


def plot(db: Path, model_name: str) -> dict[str, Any]:
    """Every evaluated run's top-n |score| curve (the CMD curve) on one plot, as ``pathdb compare``
    draws it, into ``results/methods-MODEL.png``."""
    out = RESULTS.parent / f"methods-{model_name}.png"
    with open_store(db, read_only=True) as store:
        evs = _evaluated(store.con)
    title = f"{model_name}: faithfulness on toy-ioi-heldout (counterfactual, logit difference)"
    draw_curves(evs, out, curves=("abs",), title=title)
    return {"model": model_name, "config": "plot", "file": f"benchmarks/results/{out.name}",
            "runs": [e.run_name for e in evs]}  # fmt: skip


def main() -> None:
    """Run the configurations given and merge their rows into the results file."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--configs", default="eap")
    ap.add_argument("--model", choices=MODELS, default="toy-ioi", help="bundled model to score")
    ap.add_argument(
        "--db", type=Path, default=None, help="store (default /tmp/pathdb-bench-methods[-MODEL].duckdb)",
    )  # fmt: skip
    ap.add_argument(
        "--shape-layers", type=int, default=None,
        help="layers of the random SHAPE:METHOD models (default: gpt2-shape 12 with GPT-2's vocabulary, llama-shape 4)",
    )  # fmt: skip
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    suffix = "" if args.model == "toy-ioi" else f"-{args.model}"
    db = args.db or Path(f"/tmp/pathdb-bench-methods{suffix}.duckdb")
    torch.set_num_threads(1)
    names = args.configs.split(",")
    shaped = [n for n in names if n.split(":", 1)[0] in ("gpt2-shape", "llama-shape")]
    model = prompts = None
    if len(shaped) < len(names):
        model = load(args.model, device="cpu")
        prompts = load_prompts("toy-ioi-small", model)
    old = json.loads(args.out.read_text()) if args.out.exists() else {"rows": []}
    for r in old["rows"]:  # rows from before --model scored toy-ioi
        if "model" not in r and "shape" not in r["config"]:
            r["model"] = "toy-ioi"
    rows = {(r.get("model"), r["config"]): r for r in old["rows"]}
    for name in names:
        if name == "compare":
            row = compare(db, args.model)
        elif name == "plot":
            row = plot(db, args.model)
        elif name in shaped:
            shape, method = name.split(":", 1)
            row = shape_timing(shape, method, args.shape_layers)
        else:
            row = run_config(name, db, args.model, model, prompts)
        rows[row.get("model"), row["config"]] = row
        print(json.dumps(row), flush=True)
    out = {"machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread, shared 2-core CPU",
           "date": time.strftime("%Y-%m-%d"), "rows": list(rows.values())}  # fmt: skip
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
