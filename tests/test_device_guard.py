"""CPU-only guard against the GPU route's bug class: a tensor made on the host meeting device data.

Why this design (issue 20). On CUDA the engine crashed where a tensor created without
``device=`` (a score buffer, an index, a zero message) met the model's data. CI has no GPU, so
the model and every cache must live on *some other device* while the tests run on a CPU. Options
weighed:

- ``FakeTensorMode`` tensors can claim ``cuda`` on a CPU build, but they carry no data: the engine
  reads data (the zero-message mask, scores for pruning), so no search runs under it.
- A tensor subclass claiming ``cuda`` with real CPU data runs forward code, but autograd aborts the
  process ("PyTorch is not linked with support for cuda devices") on the first VJP, so the
  attribution method cannot be exercised.
- Chosen: :class:`OnDevice`, a wrapper subclass that holds real CPU data and reports the ``meta``
  device (autograd supports it on every build). Its ``__torch_dispatch__`` raises CUDA's
  "Expected all tensors to be on the same device" when an operation mixes it with a non-scalar
  host tensor (0-dim host tensors are allowed, as on CUDA), runs the CPU kernel otherwise and wraps
  the result, so whole searches run and give the CPU numbers. A dispatch mode turns tensors created
  with ``device=<that device>`` (or moved there) into ``OnDevice``; reads back to the host (copies
  to the CPU, ``.item()``) are counted, which checks "one transfer per expansion".

Two guard-only adaptations, neither hiding a device bug: ``torch.inference_mode`` becomes
``no_grad`` (a wrapper subclass cannot make views of inference tensors), and Python-list indices
are built on the data's device, as CUDA does. Where real CUDA is stricter (``.tolist()`` /
``.numpy()`` of device tensors) the guard is too. On the engine before the fix these tests fail at
the issue's two crash sites (``ExactEvaluator.expand``'s scatter into a host buffer,
``_attn_q_step_head``'s subtraction of a host zero message) and, with host tokens, at the causal
mask of the activation cache; and at two reads back per attribution expansion instead of one.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from pathdb.graph import ModelShape, Node, NodeKind, Path, Site, predecessors
from pathdb.metrics import METRICS, custom_metric
from search.activations import ActivationCache
from search.attribution import AttributionEvaluator
from search.exact import ExactEvaluator, build_metric
from tests.engine_helpers import prompts, tiny_model

aten = torch.ops.aten
GUARD_DEVICE = torch.device("meta")
_HOST_TENSOR = torch.tensor


class Transfers:
    """Device -> host reads seen by the guard (copies to the CPU, scalar reads)."""

    count = 0


def _on_guard(device: Any) -> bool:
    return device is not None and torch.device(device).type == GUARD_DEVICE.type


def _list_index(key: Any) -> Any:
    """Python lists in an index become index tensors on the guard device (as CUDA builds them)."""
    if isinstance(key, tuple):
        return tuple(_list_index(k) for k in key)
    if isinstance(key, list):
        return OnDevice(_HOST_TENSOR(key))
    return key


class OnDevice(Tensor):
    """Real CPU data that claims to live on the guard device; refuses to mix with host tensors."""

    elem: Tensor

    @staticmethod
    def __new__(cls, elem: Tensor, requires_grad: bool = False) -> OnDevice:
        """Wrap ``elem`` (a CPU tensor without autograd history)."""
        r = Tensor._make_wrapper_subclass(
            cls, elem.size(), strides=elem.stride(), storage_offset=elem.storage_offset(),
            dtype=elem.dtype, device=GUARD_DEVICE, requires_grad=requires_grad,
        )  # fmt: skip
        r.elem = elem
        return r

    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]

    def __repr__(self) -> str:  # type: ignore[override]
        """Show the wrapped data."""
        return f"OnDevice({self.elem!r})"

    def __getitem__(self, key: Any) -> Any:
        """Indexing, with list indices made on the device."""
        return super().__getitem__(_list_index(key))

    def __setitem__(self, key: Any, value: Any) -> None:
        """Index assignment, with list indices made on the device."""
        super().__setitem__(_list_index(key), value)

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:  # type: ignore[override]
        """Run ``func`` on the wrapped CPU data after CUDA's same-device check."""
        kwargs = dict(kwargs or {})
        if func.overloadpacket in (aten._to_copy, aten.to):
            devices = [
                d for d in pytree.tree_leaves((args[1:], kwargs)) if isinstance(d, torch.device)
            ]
            rest = pytree.tree_map(
                lambda d: torch.device("cpu") if isinstance(d, torch.device) else d,
                (args[1:], kwargs),
            )
            out = func(args[0].elem, *rest[0], **rest[1])
            if devices and not _on_guard(devices[-1]):
                Transfers.count += 1
                return out
            return OnDevice(out)
        if func is aten._local_scalar_dense.default:
            Transfers.count += 1
            return func(args[0].elem)
        if func is aten.copy_.default and not isinstance(args[0], OnDevice):
            Transfers.count += 1  # host_tensor.copy_(device_tensor): a read back, allowed on CUDA
            return func(args[0], args[1].elem)
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        host = [
            t
            for t in tensors
            if not isinstance(t, OnDevice) and (t.dim() > 0 or t.device.type != "cpu")
        ]
        if host:
            raise RuntimeError(
                "Expected all tensors to be on the same device, but found at least two devices, "
                f"{GUARD_DEVICE} (data) and {host[0].device} (a tensor made without device=)! "
                f"[device guard: {func}]"
            )
        inputs = {id(t.elem): t for t in tensors if isinstance(t, OnDevice)}

        def unwrap(x: Any) -> Any:
            return x.elem if isinstance(x, OnDevice) else x

        def wrap(x: Any) -> Any:
            if not isinstance(x, Tensor):
                return x
            same = inputs.get(id(x))  # in-place and out= ops return their argument
            return OnDevice(x) if same is None else same

        return pytree.tree_map(
            wrap, func(*pytree.tree_map(unwrap, args), **pytree.tree_map(unwrap, kwargs))
        )


class _MakeOnDevice(TorchDispatchMode):
    """Tensors created with (or moved to) ``device=<guard device>`` become :class:`OnDevice`."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        """Redirect creation on the guard device to the CPU and wrap the result."""
        kwargs = dict(kwargs or {})
        wrapped = any(isinstance(t, OnDevice) for t in pytree.tree_leaves((args, kwargs)))
        if _on_guard(kwargs.get("device")) and not wrapped:
            kwargs["device"] = torch.device("cpu")
            requires_grad = bool(kwargs.pop("requires_grad", False))
            return OnDevice(func(*args, **kwargs), requires_grad=requires_grad)
        return func(*args, **kwargs)


@contextlib.contextmanager
def device_guard() -> Iterator[None]:
    """Run the block with the guard active (see the module docstring)."""
    orig_tensor, orig_as_tensor = torch.tensor, torch.as_tensor

    def tensor(
        data: Any, *a: Any, device: Any = None, requires_grad: bool = False, **k: Any
    ) -> Tensor:
        t = orig_tensor(data, *a, **k)  # torch.tensor(device=...) bypasses dispatch modes
        t = t.to(device) if _on_guard(device) else t
        return t.requires_grad_(True) if requires_grad else t

    def as_tensor(data: Any, *a: Any, device: Any = None, **k: Any) -> Tensor:
        if isinstance(data, OnDevice):
            return data.to(**k) if k else data
        t = orig_as_tensor(data, *a, **k)
        return t.to(device) if _on_guard(device) else t

    def inference_mode(mode: bool = True) -> Any:
        return torch.no_grad() if mode else contextlib.nullcontext()

    patches = {"tensor": tensor, "as_tensor": as_tensor, "inference_mode": inference_mode}
    saved = {name: getattr(torch, name) for name in patches}
    for name, fn in patches.items():
        setattr(torch, name, fn)
    try:
        with _MakeOnDevice():
            yield
    finally:
        for name, fn in saved.items():
            setattr(torch, name, fn)


def to_guard_device(model: torch.nn.Module) -> torch.nn.Module:
    """Move ``model``'s parameters and buffers onto the guard device, in place (like ``.to``)."""
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None:
                mod._parameters[name] = torch.nn.Parameter(
                    OnDevice(p.detach()), requires_grad=p.requires_grad
                )
        for name, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[name] = OnDevice(b)
    cfg = getattr(model, "cfg", None)
    if cfg is not None:
        cfg.device = GUARD_DEVICE.type
    return model


def host(t: Tensor) -> Tensor:
    """A guarded tensor's data as a plain CPU tensor (no transfer is counted)."""
    return t.elem if isinstance(t, OnDevice) else t


# ---------------------------------------------------------------- the guard itself
def test_guard_raises_where_cuda_does() -> None:
    """Both crash patterns of issue 20, and CUDA's tolerated cases."""
    with device_guard():
        dev = torch.ones(4, 3, device=GUARD_DEVICE)
        assert isinstance(dev, OnDevice) and dev.device == GUARD_DEVICE
        out = torch.empty(4, 3)
        with pytest.raises(RuntimeError, match="same device"):  # exact.expand's scatter
            out[torch.tensor([0, 1])] = dev[:2]
        with pytest.raises(RuntimeError, match="same device"):  # _attn_q_step_head's subtraction
            _ = dev - torch.zeros(4, 3)
        assert isinstance(dev * torch.tensor(2.0), OnDevice)  # a 0-dim host scalar is fine
        assert isinstance(dev[:, [0, 2]], OnDevice)  # list indices are made on the device
        Transfers.count = 0
        assert float(dev.sum()) == 12.0 and dev.cpu().device.type == "cpu"
        assert Transfers.count == 2


# ---------------------------------------------------------------- engine under the guard
L, H, T, B = 3, 2, 5, 3


def _paths(positional: bool) -> list[Path]:
    """Frontier paths over every node kind: head q / kv / k / v, kv without a source, whole
    layer q and kv, MLP; their candidate lists add EMBED senders."""
    p = T - 1 if positional else None
    k = 2 if positional else None
    f = Node.final(L, p)
    q = Node.attn(2, 0, Site.Q, p)
    paths: list[Path] = [
        (f,),
        (q, f),
        (Node.attn(2, None, Site.Q, p), f),
        (Node.attn(1, 1, Site.KV, p, k), q, f),
        (Node.attn(1, 1, Site.K, p, k), f),
        (Node.attn(1, 0, Site.V, p, k), f),
        (Node.mlp(1, k), Node.attn(2, 1, Site.KV, p, k), f),
        (Node.mlp(0, p), Node.mlp(2, p), f),
    ]
    if positional:
        paths += [(Node.attn(1, 1, Site.KV, p, None), f), (Node.attn(1, None, Site.KV, p, k), f)]
    return paths


def _candidates(receiver: Node, shape: ModelShape) -> list[Node]:
    """Single-head and whole-layer senders, kv and k / v sites (EMBED included)."""
    out = predecessors(receiver, shape)
    out += [
        c
        for c in predecessors(receiver, shape, heads=False)
        if c.head is None and c.kind is NodeKind.ATTN
    ]
    return out + [
        c
        for c in predecessors(receiver, shape, kv_sites=(Site.K, Site.V))
        if c.site in (Site.K, Site.V)
    ]


def _inputs(patch: str) -> tuple[Any, Tensor, Tensor | None, Tensor, Tensor]:
    """A float64 tiny model and prompts whose counterfactual shares tokens with the clean prompt
    (exactly-zero start messages take the engine's clean-score branch)."""
    model = tiny_model(n_layers=L, n_heads=H, seed=3)
    tokens, cf, target, cf_target = prompts(model, B, T, seed=3)
    shared = [0, 1, T - 1]  # EMBED at the root position starts a zero message too
    cf[:, shared] = tokens[:, shared]
    return model, tokens, cf if patch == "counterfactual" else None, target, cf_target


def _evaluators(model: Any, tokens: Tensor, cf: Tensor | None, target: Tensor, cf_target: Tensor, patch: str,
                root: Node) -> tuple[ExactEvaluator, AttributionEvaluator]:  # fmt: skip
    """Both evaluators on one cache (host tokens: the cache moves them to the model's device)."""
    cache = ActivationCache.build(model, tokens, cf, patch)
    m = build_metric(cache, "logit_difference", root, target, cf_target)
    return ExactEvaluator(cache, m, root), AttributionEvaluator(cache, m, root)


@pytest.mark.parametrize(
    ("patch", "positional"),
    [("counterfactual", True), ("zero", True), ("mean", True), ("counterfactual", False)],
    ids=["counterfactual", "zero", "mean", "counterfactual-position-free"],
)
def test_expand_on_device_matches_cpu(patch: str, positional: bool) -> None:
    """Exact and attribution expansions of every node kind run with the model and caches on
    another device, equal the CPU results, and read scores back once per expansion."""
    model, tokens, cf, target, cf_target = _inputs(patch)
    root = Node.final(L, T - 1 if positional else None)
    ref_exact, ref_attr = _evaluators(model, tokens, cf, target, cf_target, patch, root)
    with device_guard():
        exact, attr = _evaluators(
            to_guard_device(copy.deepcopy(model)), tokens, cf, target, cf_target, patch, root
        )
        for position in [None, *range(T)]:
            _ = exact.cache.bank(position).nonzero  # built once per bank, read back once
        for path in _paths(positional):
            cands = _candidates(path[0], exact.cache.shape)
            for ev, ref in ((exact, ref_exact), (attr, ref_attr)):
                Transfers.count = 0
                got = ev.expand(path, cands)
                assert Transfers.count == 1, (ev.method, path, Transfers.count)
                want = ref.expand(path, cands)
                assert got.per_prompt.device.type == "cpu"
                torch.testing.assert_close(got.per_prompt, want.per_prompt, rtol=1e-10, atol=1e-10)
                assert got.methods == want.methods
        full = [
            (c, *p)
            for p in _paths(positional)[:4]
            for c in predecessors(p[0], exact.cache.shape)[:3]
        ]
        for ev, ref in ((exact, ref_exact), (attr, ref_attr)):
            torch.testing.assert_close(
                ev.score_paths(full).per_prompt, ref.score_paths(full).per_prompt
            )


def test_metrics_on_device() -> None:
    """Every built-in metric and a user-defined one build and score on the data's device."""
    model, tokens, cf, target, cf_target = _inputs("counterfactual")
    root = Node.final(L, T - 1)
    path = (Node.attn(2, 0, Site.Q, T - 1), root)
    mine = custom_metric(lambda r, readout: readout.logits(r).amax(-1))
    ref_cache = ActivationCache.build(model, tokens, cf, "counterfactual")
    with device_guard():
        cache = ActivationCache.build(
            to_guard_device(copy.deepcopy(model)), tokens, cf, "counterfactual"
        )
        cands = predecessors(path[0], cache.shape)
        metrics: list[str | Callable[..., Any]] = [*sorted(METRICS), mine]
        for metric in metrics:
            ev = ExactEvaluator(cache, build_metric(cache, metric, root, target, cf_target), root)
            ref = ExactEvaluator(
                ref_cache, build_metric(ref_cache, metric, root, target, cf_target), root
            )
            torch.testing.assert_close(
                ev.expand(path, cands).per_prompt, ref.expand(path, cands).per_prompt
            )
            assert abs(ev.baseline() - ref.baseline()) < 1e-12


@pytest.mark.parametrize(
    ("method", "patch"), [("exact", "counterfactual"), ("attribution", "zero"), ("hybrid", "mean")]
)
def test_whole_search_on_device(method: str, patch: str) -> None:
    """``find_paths`` (scorer, strategies, engine) on the other device finds the CPU's paths."""
    from pathdb.prompts import PromptSet
    from search.api import find_paths
    from search.strategies import SearchParams

    model, tokens, cf, target, cf_target = _inputs(patch)
    ps = PromptSet([], tokens, cf, target, cf_target, torch.full((B,), T), "test")
    params = SearchParams(method=method, min_contribution=0.3)  # type: ignore[arg-type]
    ref = find_paths(model, ps, params, patch_type=patch)
    with device_guard():
        got = find_paths(to_guard_device(copy.deepcopy(model)), ps, params, patch_type=patch)
    assert len(ref) > 20
    assert [p.path for p in got] == [p.path for p in ref]
    for a, b in zip(got, ref, strict=True):
        assert a.method == b.method and a.kept == b.kept
        assert a.contribution == pytest.approx(b.contribution, abs=1e-10)
