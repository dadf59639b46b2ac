"""pathdb from Python: search the bundled toy IOI model, store every path, query, export and draw.

Run:  python examples/quickstart.py [--out DIR] [--threshold 0.05]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from pathdb import query
from pathdb.export import to_eap_json, to_networkx, write_graph
from pathdb.metrics import Readout, custom_metric
from pathdb.models import load
from pathdb.prompts import load_prompts
from pathdb.show import draw_circuit
from pathdb.store.db import open_store
from search import SearchParams, SearchRequest, find_paths, run_loaded


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("quickstart-out"))
    ap.add_argument("--threshold", type=float, default=0.05)
    ap.add_argument("--max-depth", type=int, default=None)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    model = load("toy-ioi")  # bundled, offline; also "gpt2-small" or a local HF checkpoint dir
    prompts = load_prompts("toy-ioi-small", model)  # 8 IOI prompts with counterfactuals and roles
    params = SearchParams(min_contribution=args.threshold, max_depth=args.max_depth)

    # 1. In memory: every evaluated path as a Python object.
    paths = find_paths(model, prompts, params, metric="logit_difference")
    complete = sorted(
        (p for p in paths if p.complete and p.kept), key=lambda p: -abs(p.contribution or 0)
    )
    print(f"{len(paths) - 1} paths evaluated, {len(complete)} complete paths kept")
    for p in complete[:5]:
        print(f"  {p.contribution:+.3f}  " + " -> ".join(n.label for n in p.path))

    # 2. A user-defined metric: the target's log-probability, per prompt (made clean-relative:
    #    a path scores clean - patched, so removing a helpful path scores positive).
    def target_logprob(row: torch.Tensor, readout: Readout) -> torch.Tensor:
        logp = readout.logits(row).log_softmax(-1)
        idx = prompts.target_ids.expand(logp.shape[:-1])[..., None]
        return logp.gather(-1, idx)[..., 0]

    custom = find_paths(
        model,
        prompts,
        SearchParams(min_contribution=0.1, max_depth=1),
        metric=custom_metric(target_logprob),
    )
    direct = sorted(
        (p for p in custom if p.kept and p.contribution is not None),
        key=lambda p: -abs(p.contribution or 0),
    )
    print(
        "custom metric (target log-prob), strongest direct effects: "
        + ", ".join(f"{p.path[0].label} {p.contribution:+.2f}" for p in direct[:4])
    )

    # 3. Into a DuckDB store (what `pathdb search` does), then query it.
    db = args.out / "quickstart.duckdb"
    res = run_loaded(
        SearchRequest(params=params),
        model,
        prompts,
        db,
        run_name="quickstart",
        replace=True,
        quiet=True,
    )
    print(f"stored run {res.name!r}: {res.n_evaluated} evaluated paths in {res.wall_s:.1f} s")
    with open_store(db, read_only=True) as store:
        print(
            query.top_paths(store.con, "quickstart", k=5)[["contribution", "path"]].to_string(
                index=False
            )
        )
        print(
            query.signed_circuits(store.con, "quickstart", top_k=5, prune=False)
            .head(8)
            .to_string(index=False)
        )
        circ = query.circuit(store.con, "quickstart", top_k=40)

    # 4. Export and draw.
    to_eap_json(circ, None, args.out / "circuit.json")
    write_graph(to_networkx(circ), args.out / "circuit.graphml")
    draw_circuit(circ, args.out / "circuit.svg", title="toy-ioi: quickstart circuit")
    print(f"wrote {args.out}/circuit.json, circuit.graphml, circuit.svg")


if __name__ == "__main__":
    main()
