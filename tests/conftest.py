"""Test-session plumbing."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_exit_status = 0


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module (tiny models: fastest, and no 2-thread stalls on a shared
    machine); modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def toy_exact_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Any]:
    """An exact search on toy-ioi (threshold 0.1, run ``exact``) in a fresh store, with its model
    and prompts, shared by the test modules of the edge rules: tests that write copy the store."""
    from pathdb.models import load
    from pathdb.prompts import load_prompts
    from search import SearchParams, SearchRequest, run_loaded

    db = tmp_path_factory.mktemp("toy-exact") / "s.duckdb"
    model = load("toy-ioi", device="cpu")
    prompts = load_prompts("toy-ioi-small", model)
    params = SearchParams(min_contribution=0.1)
    run_loaded(SearchRequest(params=params), model, prompts, db, run_name="exact", quiet=True)
    return db, model, prompts


@pytest.fixture(scope="module")
def model64() -> Any:
    """toy-ioi-2l in float64, so hand-written forwards agree with the library's far below 1e-5."""
    from pathdb.models import load

    return load("toy-ioi-2l", device="cpu", dtype="float64")


@pytest.fixture(scope="module")
def prompts64(model64: Any) -> Any:
    """toy-ioi-small tokenized for :func:`model64`."""
    from pathdb.prompts import load_prompts

    return load_prompts("toy-ioi-small", model64)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Remember the session's exit status for :func:`pytest_unconfigure`."""
    global _exit_status
    _exit_status = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """End the process without interpreter teardown, keeping pytest's summary the last output line.

    DuckDB 2.0's nanobind bindings print dozens of "nanobind: leaked ..." lines for duckdb's own
    module-level constants when the interpreter tears down after SQLAlchemy and torch were loaded
    (not objects of ours). Every other plugin has unconfigured by now (trylast).
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status)
