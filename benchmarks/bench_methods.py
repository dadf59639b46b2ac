"""The seed documents' attribution methods against pathdb's path searches on ``toy-ioi``: CPR, CMD,
edges for 80% / 90% faithfulness and wall time, judged as ``pathdb evaluate`` / ``pathdb compare``.

Every configuration scores ``toy-ioi`` on ``toy-ioi-small`` (counterfactual patching, logit
difference) into one store (``--db``) -- the methods through ``search.methods.run.attribute`` (the
code of ``pathdb attribute``), the path searches through ``run_loaded`` (``pathdb search``;
positional, ``-t 0.05``) -- then evaluates the run on the bundled held-out set ``toy-ioi-heldout``
exactly as ``pathdb evaluate RUN`` and stores the evaluation; ``compare`` reports what
``pathdb compare`` does over every run of the store (latest evaluations, top-50 Jaccard, Spearman).
Usage (each configuration stays around a minute on a loaded 2-core machine)::

    python benchmarks/bench_methods.py --configs eap,eap-ig,atp*,edge-patching
    python benchmarks/bench_methods.py --configs learned-mask-p0.02,learned-mask-p0.1
    python benchmarks/bench_methods.py --configs exact,attribution,hybrid
    python benchmarks/bench_methods.py --configs compare
    python benchmarks/bench_methods.py --configs gpt2-shape:eap   # seconds on a random GPT-2 small

Rows are merged into ``benchmarks/results/methods.json`` by configuration name.
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


def score(name: str, db: Path, model: Any, prompts: Any) -> float:
    """Store configuration ``name`` as run ``name`` (replacing it); its wall seconds."""
    if name in SEARCHES:
        req = SearchRequest(
            model="toy-ioi", params=SearchParams(method=name, min_contribution=0.05)
        )  # type: ignore[arg-type]
        return float(
            run_loaded(req, model, prompts, db, run_name=name, quiet=True, replace=True).wall_s
        )
    spec = METHODS[name]
    areq = AttributeRequest(
        method=spec["method"], model="toy-ioi", device="cpu", options=dict(spec.get("options", {}))
    )
    return float(attribute(areq, db, run_name=name, replace=True)[0].wall_s)


def run_config(name: str, db: Path, model: Any, prompts: Any) -> dict[str, Any]:
    """Score, evaluate on toy-ioi-heldout (stored), and return the row."""
    wall = score(name, db, model, prompts)
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
        "config": name, "kind": kind, "wall_s": round(wall, 2), "cpr": round(ev.cpr, 4),
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


GPT2_METHODS = ("eap", "eap-ig", "atp-qk", "atp*", "learned-mask")


def gpt2_shape(method: str, batch: int = 4, seq: int = 15) -> dict[str, Any]:
    """Seconds of one method on a random GPT-2-small-shaped model (12L/12H/d768, 32,491 edges):
    ``eap-ig`` 5 steps, learned-mask per Adam step (edge-patching would need 32,491 masked
    forwards and is not timed)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from pathdb.evaluate.masked import MaskedEvaluator
    from search.methods.atp_star import atp_star
    from search.methods.eap import eap
    from search.methods.eap_ig import eap_ig
    from search.methods.learned_mask import learned_mask

    cfg = HookedTransformerConfig(
        n_layers=12, n_heads=12, d_model=768, d_head=64, d_mlp=3072, d_vocab=50257, n_ctx=64,
        act_fn="gelu_new", normalization_type="LN", positional_embedding_type="standard", seed=0,
    )  # fmt: skip
    model = HookedTransformer(cfg).eval()
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
    return {"config": f"gpt2-shape:{method}", "prompts": prompts.source,
            "n_edges": ev.graph.n_edges, "seconds": round(seconds, 2)}  # fmt: skip


def compare(db: Path) -> dict[str, Any]:
    """What ``pathdb compare`` reports over every evaluated run of the store."""
    with open_store(db, read_only=True) as store:
        names = [
            r[0] for r in store.con.execute("SELECT name FROM runs ORDER BY run_id").fetchall()
        ]
        names = [n for n in names if latest_evaluation(store.con, n) is not None]
        evs = [latest_evaluation(store.con, n) for n in names]
        table = summary(store.con, [e for e in evs if e is not None])
        pairs = agreement(store.con, names, top_k=50)
    return {"config": "compare", "summary": json.loads(table.to_json(orient="records")),
            "agreement": json.loads(pairs.round(4).to_json(orient="records"))}  # fmt: skip


def main() -> None:
    """Run the configurations given and merge their rows into the results file."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--configs", default="eap")
    ap.add_argument("--db", type=Path, default=Path("/tmp/pathdb-bench-methods.duckdb"))
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = load("toy-ioi", device="cpu")
    prompts = load_prompts("toy-ioi-small", model)
    old = json.loads(args.out.read_text()) if args.out.exists() else {"rows": []}
    rows = {r["config"]: r for r in old["rows"]}
    for name in args.configs.split(","):
        if name == "compare":
            row = compare(args.db)
        elif name.startswith("gpt2-shape:"):
            row = gpt2_shape(name.split(":", 1)[1])
        else:
            row = run_config(name, args.db, model, prompts)
        rows[name] = row
        print(json.dumps(row), flush=True)
    out = {"machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread, shared 2-core CPU",
           "date": time.strftime("%Y-%m-%d"), "rows": list(rows.values())}  # fmt: skip
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
