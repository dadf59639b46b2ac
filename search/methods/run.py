"""``pathdb attribute``: validate a method request, load the model and prompts as ``pathdb search``
does, score every edge with the method and store one edge-score run (a learned-mask penalty sweep
stores one run per penalty). Every refusal happens before anything is loaded or written."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pathdb
from pathdb.evaluate.masked import PATCH_INTERVENTION, MaskedEvaluator
from pathdb.methods import DEFAULTS, METHOD_OPTIONS, option_problem
from pathdb.store.names import check_run_name
from search.methods.common import EdgeScores
from search.runner import SearchError, SearchRequest, _load_inputs, _prompt_rows
from search.threads import torch_threads


class MethodError(SearchError):
    """An attribution request that cannot run (names the option and the fix)."""


@dataclass
class AttributeRequest:
    """Everything ``pathdb attribute`` needs; stored (with the method's options) in the run's params."""

    method: str = "eap"
    model: str = "toy-ioi"
    prompts: str | None = "toy-ioi-small"
    clean: str | None = None
    target: str | None = None
    counterfactual: str | None = None
    cf_target: str | None = None
    metric: str = "logit-diff"
    patch_type: str = "counterfactual"
    device: str | None = None
    dtype: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # given method options only

    def search_request(self) -> SearchRequest:
        """The equivalent search request (position-free, batch), for loading and checks."""
        return SearchRequest(
            model=self.model, prompts=self.prompts, clean=self.clean, target=self.target,
            counterfactual=self.counterfactual, cf_target=self.cf_target, metric=self.metric,
            patch_type=self.patch_type, positional=False, device=self.device, dtype=self.dtype,
        )  # fmt: skip

    def option(self, key: str) -> Any:
        """A method option: the given value, else its default."""
        value = self.options.get(key)
        return DEFAULTS[key] if value is None else value

    def validate(self) -> None:
        """Refuse unknown methods, options that do not apply and bad values (nothing loaded yet)."""
        problem = option_problem(self.method, self.options)
        if problem is not None:
            raise MethodError(problem)
        req = self.search_request()
        req.validate()
        self.metric = req.metric

    def params(self, method_info: dict[str, Any]) -> dict[str, Any]:
        """The run's ``params`` JSON: the request (``model``/``prompts``/``dtype`` as for path runs)
        with the method options in effect and what the method reported."""
        d = asdict(self)
        used = {
            k: self.option(k)
            for k, (_, methods) in METHOD_OPTIONS.items()
            if self.method in methods
        }
        d["options"] = {k: v for k, v in used.items() if k != "penalties"} | method_info
        return d


@dataclass
class StoredRun:
    """One stored edge run, as the CLI reports it."""

    run_id: int
    name: str
    method: str
    wall_s: float
    n_edges: int
    info: dict[str, Any]


Progress = Callable[[str, int, int], None]


def compute(
    req: AttributeRequest, ev: MaskedEvaluator, progress: Progress | None = None
) -> list[EdgeScores]:
    """Run the method (every penalty of a learned-mask sweep) on a built evaluator."""
    from search.methods.atp_star import atp_star
    from search.methods.eap import eap
    from search.methods.eap_ig import eap_ig
    from search.methods.edge_patching import edge_patching
    from search.methods.learned_mask import learned_mask

    def report(what: str) -> Callable[[int, int], None] | None:
        return None if progress is None else (lambda done, total: progress(what, done, total))

    if req.method == "eap":
        return [eap(ev)]
    if req.method == "eap-ig":
        return [eap_ig(ev, req.option("ig_steps"))]
    if req.method == "atp*":
        return [atp_star(ev, qk_fix=req.option("qk_fix"), grad_drop=req.option("grad_drop"))]
    if req.method == "edge-patching":
        return [edge_patching(ev, report("edges"))]
    results = []
    for pen in req.option("penalties"):
        step = report(f"penalty {pen:g}")

        def each(done: int, total: int, loss: float, step: Any = step) -> None:
            if step is not None:
                step(done, total)

        results.append(learned_mask(
            ev, penalty=pen, steps=req.option("steps"), lr=req.option("lr"), seed=req.option("seed"),
            progress=each,
        ))  # fmt: skip
    return results


def _names(name: str | None, req: AttributeRequest) -> list[str | None]:
    """Run names: ``name``, or ``name-p{penalty}`` per penalty of a sweep."""
    pens = req.option("penalties") if req.method == "learned-mask" else [None]
    if name is None or len(pens) == 1:
        return [name] * len(pens)
    return [f"{name}-p{p:g}" for p in pens]


def _check_names_free(db: Path, names: list[str | None]) -> None:
    """Refuse taken run names before any work (a store that needs an upgrade is checked at write)."""
    from pathdb.store.db import open_store
    from pathdb.store.errors import StoreError

    if not db.exists():
        return
    try:
        store = open_store(db, read_only=True)
    except StoreError:
        return
    with store:
        for n in names:
            if (
                n is not None
                and store.con.execute("SELECT 1 FROM runs WHERE name = ?", [n]).fetchall()
            ):
                raise MethodError(
                    f"a run named {n!r} already exists in {db}; choose another --run-name or pass --replace"
                )


def attribute(
    req: AttributeRequest,
    db: Path,
    *,
    run_name: str | None = None,
    replace: bool = False,
    threads: int | None = 1,
    progress: Progress | None = None,
) -> list[StoredRun]:
    """Validate, load, score and store; returns the stored runs."""
    from pathdb.models import fingerprint
    from pathdb.store.db import open_store
    from pathdb.store.edge_runs import edge_table, write_edge_run

    req.validate()
    names = _names(run_name, req)
    for n in names:
        if n is not None:
            check_run_name(n)
    if not replace:
        _check_names_free(db, names)
    with torch_threads(threads):
        model, prompts = _load_inputs(req.search_request())
        t_start = time.perf_counter()  # timings exclude loading, as a path run's
        if req.patch_type == "counterfactual" and prompts.cf_tokens is None:
            raise MethodError(
                f"--method {req.method} with --patch counterfactual needs a counterfactual prompt "
                f"on every prompt of {prompts.source}; add them, or use --patch zero|mean"
            )
        ev = MaskedEvaluator(model, prompts, req.metric, PATCH_INTERVENTION[req.patch_type])
        t_eval = time.perf_counter()
        results = compute(req, ev, progress)
        eval_s = time.perf_counter() - t_eval
    cfg = model.cfg
    meta = {
        "model_name": req.model, "model_fingerprint": fingerprint(model), "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads, "d_model": cfg.d_model, "method": req.method, "strategy": "attribute",
        "metric": req.metric, "patch_type": req.patch_type, "prompt_mode": "batch",
        "positional": False, "package_version": pathdb.__version__,
    }  # fmt: skip
    stored = []
    wall_s = (time.perf_counter() - t_start) / len(results)
    with open_store(db) as store:
        for name, res in zip(names, results, strict=True):
            edges = edge_table(cfg.n_layers, cfg.n_heads, res.scores, res.in_graph, ev.parallel)
            run_id, final = write_edge_run(
                store, name=name, meta=meta | {"params": req.params(res.info)},
                prompts=_prompt_rows(prompts), edges=edges, node_scores=res.node_scores,
                wall_s=wall_s, eval_s=eval_s / len(results), replace=replace,
            )  # fmt: skip
            stored.append(StoredRun(run_id, final, req.method, wall_s, edges.num_rows, res.info))
    return stored
