"""Run one matched search with ipe and with pathdb; return the complete paths and the wall time.

ipe is timed around its search call only (its activation caches are built before the timer);
pathdb is timed around :func:`search.runner.run_loaded`, which caches activations, searches and
writes every evaluated path into a DuckDB store (a fresh file per run, schema created before the
timer so the Alembic migration is not counted).
"""

from __future__ import annotations

import functools
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ipe_compat.translate import Labels, ipe_labels, pathdb_labels
from pathdb.prompts import PromptSet
from pathdb.store.db import open_store
from pathdb.store.reader import iter_paths, run_nodes
from search.runner import SearchRequest, run_loaded
from search.strategies import SearchParams

Method = Literal["exact", "attribution"]
Strategy = Literal["threshold", "best-first", "level-width"]


@dataclass(frozen=True)
class Case:
    """One matched configuration run by both tools."""

    name: str
    method: Method
    strategy: Strategy
    patch_type: str
    positional: bool
    min_contribution: float = 1.0
    top_n: int = 20
    max_width: int = 10
    include_negative: bool = True
    batch_heads: bool = False
    batch_positions: bool = False
    metric: str = "target_logit_percentage"

    def to_json(self) -> dict[str, Any]:
        """Plain JSON for the results file."""
        return asdict(self)

    def params(self) -> SearchParams:
        """pathdb search parameters equivalent to this case."""
        return SearchParams(
            strategy=self.strategy,
            method=self.method,
            min_contribution=self.min_contribution,
            include_negative=self.include_negative,
            top_n=self.top_n,
            max_width=self.max_width,
            batch_heads=self.batch_heads,
            batch_positions=self.batch_positions,
            max_time=None,
        )


@dataclass
class ToolRun:
    """Outcome of one tool on one case: complete paths (labels -> score) and timings."""

    paths: dict[Labels, float]
    wall_s: float
    extra: dict[str, Any]


# ------------------------------------------------------------------------------------------- ipe
@dataclass
class IpeInputs:
    """ipe's per-run inputs: caches (fresh dicts, ipe adds head outputs to them), metric, root."""

    root: Any
    metric: Any
    cache_s: float


def ipe_inputs(ipe: Any, model: Any, prompts: PromptSet, case: Case) -> IpeInputs:
    """Build ipe's clean/counterfactual caches with ``run_with_cache`` and its FINAL root."""
    t0 = time.perf_counter()
    with torch.no_grad():
        _, clean = model.run_with_cache(prompts.clean_tokens)
        msg_cache = dict(clean)
        cf_cache: dict[str, torch.Tensor] = {}
        if case.patch_type == "counterfactual":
            _, cf = model.run_with_cache(prompts.cf_tokens)
            cf_cache = dict(cf)
    cache_s = time.perf_counter() - t0
    n_layers = model.cfg.n_layers
    if case.metric != "target_logit_percentage":
        raise ValueError(
            f"the ipe comparison is wired for target_logit_percentage, not {case.metric!r}"
        )
    metric = functools.partial(
        ipe.metrics.target_logit_percentage,
        clean_final_resid=msg_cache[f"blocks.{n_layers - 1}.hook_resid_post"],
        model=model,
        target_tokens=[int(t) for t in prompts.target_ids],
    )
    position = prompts.clean_tokens.shape[1] - 1 if case.positional else None
    root = ipe.nodes.FINAL_Node(
        model=model,
        layer=n_layers - 1,
        position=position,
        msg_cache=msg_cache,
        cf_cache=cf_cache,
        metric=metric,
        patch_type=case.patch_type,
    )
    return IpeInputs(root=root, metric=metric, cache_s=cache_s)


def _ipe_call(ipe: Any, model: Any, case: Case, inputs: IpeInputs) -> list[tuple[Any, list[Any]]]:
    gs = ipe.graph_search
    common = {
        "model": model,
        "metric": inputs.metric,
        "root": inputs.root,
        "include_negative": case.include_negative,
    }
    batching = {"batch_heads": case.batch_heads, "batch_positions": case.batch_positions}
    if case.method == "exact":
        if case.strategy == "threshold":
            return gs.PathMessagePatching(
                min_contribution=case.min_contribution, **common, **batching
            )
        if case.strategy == "best-first":
            return gs.PathMessagePatching_BestFirstSearch(
                top_n=case.top_n, max_time=10**9, **common, **batching
            )
        return gs.PathMessagePatching_LimitedLevelWidth(
            max_width=case.max_width, **common, **batching
        )
    if case.batch_heads or case.batch_positions:
        raise ValueError("ipe's attribution searches have no batch_heads / batch_positions")
    if case.strategy == "threshold":
        return gs.PathAttributionPatching(min_contribution=case.min_contribution, **common)
    if case.strategy == "best-first":
        return gs.PathAttributionPatching_BestFirstSearch(
            top_n=case.top_n, max_time=10**9, **common
        )
    return gs.PathAttributionPatching_LimitedLevelWidth(max_width=case.max_width, **common)


def run_ipe(ipe: Any, model: Any, prompts: PromptSet, case: Case) -> ToolRun:
    """Run ipe's search for ``case`` on fresh caches; time the search call only."""
    inputs = ipe_inputs(ipe, model, prompts, case)
    t0 = time.perf_counter()
    found = _ipe_call(ipe, model, case, inputs)
    wall = time.perf_counter() - t0
    n_layers = model.cfg.n_layers
    paths: dict[Labels, float] = {}
    for score, path in found:
        paths[ipe_labels(path, n_layers)] = float(score)
    return ToolRun(
        paths=paths, wall_s=wall, extra={"cache_s": inputs.cache_s, "n_returned": len(found)}
    )


# ---------------------------------------------------------------------------------------- pathdb
def _request(case: Case, model_name: str, prompts_name: str) -> SearchRequest:
    return SearchRequest(
        model=model_name,
        prompts=prompts_name,
        metric=case.metric,
        patch_type=case.patch_type,
        positional=case.positional,
        params=case.params(),
        group_effects=False,  # ipe has no counterpart: time the search and its store only
    )


def pathdb_results(db: Path, run_id: int) -> dict[Labels, float]:
    """Complete, kept paths of a stored run (label tuple -> contribution)."""
    with open_store(db, read_only=True) as store:
        nodes = run_nodes(store, run_id)
        table = iter_paths(store, run_id, complete=True, kept=True).to_pydict()
    return {
        pathdb_labels([nodes[n] for n in seq]): float(score)
        for seq, score in zip(table["node_ids"], table["contribution"], strict=True)
    }


def run_pathdb(
    model: Any,
    prompts: PromptSet,
    case: Case,
    *,
    model_name: str,
    prompts_name: str,
    workdir: Path | None = None,
) -> ToolRun:
    """Run pathdb's search for ``case`` into a fresh DuckDB store; time ``run_loaded``."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        db = Path(tmp) / "bench.duckdb"
        open_store(db).close()  # create + migrate the schema outside the timer
        req = _request(case, model_name, prompts_name)
        t0 = time.perf_counter()
        res = run_loaded(req, model, prompts, db, run_name=case.name, quiet=True)
        wall = time.perf_counter() - t0
        paths = pathdb_results(db, res.run_id)
        if not case.include_negative:
            paths = {k: v for k, v in paths.items() if v > 0}
        extra = {
            "n_evaluated": res.n_evaluated,
            "eval_s": res.eval_s,
            "write_s": res.write_s,
            "db_bytes": db.stat().st_size,
        }
    return ToolRun(paths=paths, wall_s=wall, extra=extra)
