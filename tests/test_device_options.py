"""``--device`` / ``--dtype`` of ``pathdb search`` and their Python API counterparts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pathdb.graph import Node, Site, predecessors
from pathdb.models import DeviceError, load, move_model, resolve_device, resolve_dtype
from pathdb.models.loading import NO_CUDA
from pathdb.prompts import load_prompts
from pathdb.store.db import open_store
from pathdb.store.reader import get_run
from search.runner import SearchError, SearchRequest
from search.scorer import build_scorer
from tests.cli_process import pathdb


@pytest.mark.skipif(torch.backends.cuda.is_built(), reason="this torch has CUDA")
def test_cli_device_cuda_without_cuda_is_one_line(tmp_path: Path) -> None:
    """``--device cuda`` on a CPU-only torch: one line naming the fix, no traceback, no store."""
    res = pathdb(
        "search", "-q", "--db", str(tmp_path / "x.duckdb"), "--device", "cuda", cwd=tmp_path
    )
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"error: {NO_CUDA}"], res.stderr
    assert not (tmp_path / "x.duckdb").exists()


def test_cli_dtype_float64_search_is_recorded(tmp_path: Path) -> None:
    """``--device cpu --dtype float64`` runs the search in float64 and records both in the run."""
    db = tmp_path / "p.duckdb"
    res = pathdb(
        "search", "-q", "--db", str(db), "-n", "f64", "--device", "cpu", "--dtype", "float64",
        "--max-depth", "1", "-t", "0.5", cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    with open_store(db, read_only=True) as store:
        params = get_run(store, "f64")["params"]
    assert (params["device"], params["dtype"]) == ("cpu", "float64")


def test_resolvers() -> None:
    """auto follows torch; dtype names map to torch dtypes; bad ones raise DeviceError."""
    assert (
        resolve_device("auto")
        == resolve_device(None)
        == ("cuda" if torch.cuda.is_available() else "cpu")
    )
    assert resolve_device(" CPU ") == "cpu"
    assert resolve_dtype(None) is torch.float32 and resolve_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(DeviceError, match="cuda:N"):
        resolve_device("cuda:x")
    with pytest.raises(DeviceError, match="int8"):
        resolve_dtype(torch.int8)
    with pytest.raises(
        SearchError,
        match=r"^--dtype must be one of float32, bfloat16, float16, float64 \(got 'half'\)$",
    ):
        SearchRequest(dtype="half").validate()
    with pytest.raises(
        SearchError, match=r"^--device must be cpu, cuda, cuda:N or auto \(got 'tpu'\)$"
    ):
        SearchRequest(device="tpu").validate()


def test_load_and_move_in_dtype() -> None:
    """``load(dtype=)`` and ``move_model`` give a model whose engine runs in that dtype (bfloat16
    scores within bfloat16 rounding of float32's)."""
    model = load("toy-ioi", device="cpu", dtype="bfloat16")
    assert model.W_E.dtype is torch.bfloat16 and model.cfg.dtype is torch.bfloat16
    prompts = load_prompts("toy-ioi-small", model)
    root = Node.final(model.cfg.n_layers, prompts.n_positions - 1)
    path = (Node.attn(3, 0, Site.Q, root.position), root)
    scorer = build_scorer(model, prompts)
    low = scorer.exact.expand(path, predecessors(path[0], scorer.shape))
    move_model(model, dtype="float32")
    assert model.W_E.dtype is torch.float32
    scorer = build_scorer(model, prompts)
    high = scorer.exact.expand(path, predecessors(path[0], scorer.shape))
    assert low.per_prompt.dtype is torch.bfloat16
    torch.testing.assert_close(low.mean, high.mean, atol=0.1, rtol=0.05)
