"""Prompt sets: the JSONL prompt-file format, its validation, and batched token tensors.

Format (UTF-8, one JSON object per line; blank lines are ignored)::

    {"clean": "When Mary and John went to the store, John gave a drink to",
     "counterfactual": "When Mary and John went to the store, Mary gave a drink to",
     "target": " Mary", "cf_target": " John",
     "roles": ["BOS", "-", "IO", "-", "S1", "-", "-", "-", "-", "-", "S2", "-", "-", "-", "END"]}

- ``clean`` (required): the prompt; the model predicts the token after it.
- ``target`` (required): the token whose logit the metrics read; must be a single token
  (for GPT-2 write names with a leading space, `` Mary``; the toy tokenizers accept either).
- ``counterfactual`` (optional): the corrupted prompt for counterfactual patching; it must
  tokenize to the same length as ``clean`` so positions align.
- ``cf_target`` (optional): the counterfactual answer (for logit-difference metrics).
- ``roles`` (optional): one label per token of ``clean`` *including* the leading BOS
  (e.g. BOS, IO, S1, S2, END, ``-`` for others).
Within one file ``counterfactual`` and ``cf_target`` are given on every line or on none.
Prompts may have different token lengths: a batch search then scores each length (position-free)
or each role layout (positional: positions are roles, see :mod:`pathdb.positions`) as its own
batch. Role labels are names (letters, digits, ``_``), each naming at most one token of a prompt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # TransformerLens 4 has no HookedTransformer (its bridges load as look-alikes)
    from transformer_lens import HookedTransformer

from pathdb.positions import PositionAxis, RoleError, check_roles

REQUIRED_FIELDS = ("clean", "target")
OPTIONAL_TEXT_FIELDS = ("counterfactual", "cf_target")
KNOWN_FIELDS = (*REQUIRED_FIELDS, *OPTIONAL_TEXT_FIELDS, "roles")


class PromptFileError(ValueError):
    """A prompt file (or single prompt) is invalid; the message names file, line, field and the fix."""


@dataclass(frozen=True)
class PromptRecord:
    """One validated prompt with its tokenization."""

    clean: str
    counterfactual: str | None
    target: str
    cf_target: str | None
    roles: list[str] | None
    tokens: list[int]
    token_strs: list[str]
    cf_tokens: list[int] | None
    target_id: int
    cf_target_id: int | None
    line: int  # 1-based line in the source file (1 for a single prompt)


@dataclass(frozen=True)
class PromptSet:
    """A batch of prompts: records plus aligned token tensors on the model's device.

    ``clean_tokens``/``cf_tokens`` are ``[B, T]``; when lengths differ (only possible with
    ``require_equal_length=False``) rows are right-padded and ``lengths`` gives true lengths.
    """

    records: list[PromptRecord]
    clean_tokens: torch.Tensor
    cf_tokens: torch.Tensor | None
    target_ids: torch.Tensor
    cf_target_ids: torch.Tensor | None
    lengths: torch.Tensor
    source: str

    def __len__(self) -> int:
        """Number of prompts."""
        return len(self.records)

    @property
    def n_positions(self) -> int:
        """Token length T of the batch (including BOS)."""
        return int(self.clean_tokens.shape[1])

    @property
    def equal_length(self) -> bool:
        """Whether every prompt has the same token length (positions align across the batch)."""
        return bool((self.lengths == self.lengths[0]).all())

    @property
    def has_roles(self) -> bool:
        """Whether every prompt carries role labels."""
        return all(r.roles is not None for r in self.records)

    def position_axis(self) -> PositionAxis:
        """The role-aligned position axis of these prompts (:mod:`pathdb.positions`)."""
        if not self.has_roles:
            raise RoleError(
                "role positions need role labels on every prompt ('roles' in the prompt file)"
            )
        return PositionAxis.from_roles([r.roles or [] for r in self.records])

    def subset(self, i: int) -> PromptSet:
        """The one-prompt PromptSet of prompt ``i`` (padding trimmed)."""
        return replace(self.select([i]), source=f"{self.source}[{i}]")

    def select(self, indices: list[int]) -> PromptSet:
        """The prompts at ``indices`` (in that order), padding trimmed to the longest of them."""
        idx = torch.tensor(indices, dtype=torch.long)
        n = int(self.lengths[idx].max())
        dev = self.clean_tokens.device
        rows = idx.to(dev)
        return replace(
            self,
            records=[self.records[i] for i in indices],
            clean_tokens=self.clean_tokens[rows, :n],
            cf_tokens=None if self.cf_tokens is None else self.cf_tokens[rows, :n],
            target_ids=self.target_ids[rows],
            cf_target_ids=None if self.cf_target_ids is None else self.cf_target_ids[rows],
            lengths=self.lengths[idx],
        )

    def by_length(self) -> list[tuple[list[int], PromptSet]]:
        """Equal-length groups ``(prompt indices, PromptSet)``, shortest first (no padding inside)."""
        lengths = [int(n) for n in self.lengths]
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(lengths):
            groups.setdefault(n, []).append(i)
        return [(ix, self.select(ix)) for _, ix in sorted(groups.items())]


# ---------------------------------------------------------------- bundled sets
def bundled_prompt_sets() -> list[str]:
    """Names of the bundled prompt sets (``pathdb/data/prompts/<name>.jsonl``)."""
    root = resources.files("pathdb").joinpath("data", "prompts")
    if not root.is_dir():
        return []
    return sorted(
        p.name.removesuffix(".jsonl") for p in root.iterdir() if p.name.endswith(".jsonl")
    )


def _read_source(path_or_name: str | Path) -> tuple[str, str]:
    """(display source, text) of a bundled set name or a file path."""
    name = str(path_or_name)
    if name in bundled_prompt_sets():
        res = resources.files("pathdb").joinpath("data", "prompts", f"{name}.jsonl")
        return name, res.read_text(encoding="utf-8")
    path = Path(path_or_name).expanduser()
    if not path.is_file():
        raise PromptFileError(
            f"{name}: no such prompt file or bundled prompt set. Pass a JSONL file path or one of: "
            f"{', '.join(bundled_prompt_sets())}"
        )
    try:
        return str(path), path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PromptFileError(f"{path}: not UTF-8 text ({e}); save the file as UTF-8 JSONL") from e


# ---------------------------------------------------------------- validation
class _Ctx:
    """Where a record came from, to build error messages."""

    def __init__(self, source: str, line: int) -> None:
        self.source, self.line = source, line

    def error(self, field: str | None, problem: str, fix: str) -> PromptFileError:
        """A PromptFileError naming file, line and field."""
        where = f"{self.source}, line {self.line}" + (f", field '{field}'" if field else "")
        return PromptFileError(f"{where}: {problem}. Fix: {fix}")


def _text_field(obj: dict[str, Any], field: str, ctx: _Ctx, required: bool) -> str | None:
    """A non-empty string field (or None when optional and absent)."""
    if field not in obj or obj[field] is None:
        if required:
            raise ctx.error(field, "missing required field", f'add "{field}": "..." to the object')
        return None
    value = obj[field]
    if not isinstance(value, str):
        raise ctx.error(
            field,
            f"expected a string, got {type(value).__name__} {value!r}",
            "write it as a JSON string",
        )
    if not value.strip():
        raise ctx.error(
            field, "empty string", "give a non-empty value or leave the optional field out"
        )
    return value


def _has_unk(model: HookedTransformer) -> int | None:
    """The tokenizer's real <unk> id (None when it has none or it doubles as BOS/EOS, as in GPT-2)."""
    tok = model.tokenizer
    if tok is None or tok.unk_token_id is None:
        return None
    unk = int(tok.unk_token_id)
    return None if unk in (tok.bos_token_id, tok.eos_token_id) else unk


def _check_known_words(model: HookedTransformer, text: str, field: str, ctx: _Ctx) -> None:
    """Raise naming the first word the tokenizer maps to <unk>."""
    unk = _has_unk(model)
    if unk is None or model.tokenizer is None:
        return
    enc = model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    for tid, (s, e) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
        if tid == unk:
            raise ctx.error(
                field,
                f"word {text[s:e]!r} is not in the model's vocabulary",
                "use only words the model knows (for the toy models: the names and template words of "
                "pathdb.models.ioi_data)",
            )


def _single_token(model: HookedTransformer, text: str, field: str, ctx: _Ctx) -> int:
    """The token id of a target that must be exactly one token."""
    _check_known_words(model, text, field, ctx)
    toks = model.to_tokens(text, prepend_bos=False, move_to_device=False)[0]
    if toks.numel() != 1:
        strs = model.to_str_tokens(toks)
        raise ctx.error(
            field,
            f"{text!r} is {toks.numel()} tokens {strs}, not a single token",
            "choose a target that is one token (for GPT-2 write names with a leading space, e.g. ' Mary')",
        )
    return int(toks[0])


def _tokens(model: HookedTransformer, text: str, field: str, ctx: _Ctx) -> list[int]:
    """Token ids of a prompt with BOS prepended as the model does by default."""
    _check_known_words(model, text, field, ctx)
    tokens = [int(t) for t in model.to_tokens(text, move_to_device=False, truncate=False)[0]]
    if len(tokens) > model.cfg.n_ctx:
        raise ctx.error(
            field,
            f"prompt is {len(tokens)} tokens, longer than the model's context of {model.cfg.n_ctx}",
            "shorten the prompt",
        )
    return tokens


def _record(model: HookedTransformer, obj: Any, ctx: _Ctx) -> PromptRecord:
    """Validate one decoded JSON value and tokenize it."""
    if not isinstance(obj, dict):
        raise ctx.error(
            None,
            f"expected a JSON object, got {type(obj).__name__}",
            'write one object per line: {"clean": ..., "target": ...}',
        )
    clean = _text_field(obj, "clean", ctx, True)
    target = _text_field(obj, "target", ctx, True)
    cf = _text_field(obj, "counterfactual", ctx, False)
    cf_target = _text_field(obj, "cf_target", ctx, False)
    assert clean is not None and target is not None
    tokens = _tokens(model, clean, "clean", ctx)
    cf_tokens = None
    if cf is not None:
        cf_tokens = _tokens(model, cf, "counterfactual", ctx)
        if len(cf_tokens) != len(tokens):
            raise ctx.error(
                "counterfactual",
                f"counterfactual is {len(cf_tokens)} tokens but clean is {len(tokens)} (positions must align)",
                "make the counterfactual tokenize to the same length as the clean prompt (e.g. swap single-token names)",
            )
    roles = obj.get("roles")
    if roles is not None:
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise ctx.error(
                "roles",
                f"expected a list of strings, got {roles!r}",
                'write e.g. "roles": ["BOS", "-", "IO", ...]',
            )
        if len(roles) != len(tokens):
            raise ctx.error(
                "roles",
                f"{len(roles)} labels but the clean prompt has {len(tokens)} tokens (including BOS): {model.to_str_tokens(torch.tensor(tokens))}",
                "give exactly one label per token, BOS included (use '-' for unlabelled tokens)",
            )
        try:
            check_roles(roles)
        except RoleError as e:
            raise ctx.error("roles", str(e).split("; ")[0], str(e).split("; ", 1)[-1]) from None
    target_id = _single_token(model, target, "target", ctx)
    cf_target_id = None if cf_target is None else _single_token(model, cf_target, "cf_target", ctx)
    if cf_target_id is not None and cf_target_id == target_id:
        raise ctx.error(
            "cf_target",
            f"cf_target {cf_target!r} is the same token as target {target!r}, so the logit difference is 0 for every path",
            "give the competing answer as cf_target (e.g. the subject name in IOI), or drop cf_target",
        )
    if cf_tokens is not None and cf_tokens == tokens:
        raise ctx.error(
            "counterfactual",
            "counterfactual is the same token sequence as clean, so every path's start message is 0",
            "give a counterfactual that differs where the behaviour should change (e.g. another name), or drop it and use zero patching",
        )
    return PromptRecord(
        clean=clean,
        counterfactual=cf,
        target=target,
        cf_target=cf_target,
        roles=roles,
        tokens=tokens,
        token_strs=[str(s) for s in model.to_str_tokens(torch.tensor(tokens))],
        cf_tokens=cf_tokens,
        target_id=target_id,
        cf_target_id=cf_target_id,
        line=ctx.line,
    )


def _check_consistent(records: list[PromptRecord], source: str, require_equal_length: bool) -> None:
    """Optional fields given on all lines or none; equal token lengths in batch mode."""
    first = records[0]
    for r in records[1:]:
        ctx = _Ctx(source, r.line)
        for field in OPTIONAL_TEXT_FIELDS:
            if (getattr(r, field) is None) != (getattr(first, field) is None):
                has = "has" if getattr(first, field) is not None else "lacks"
                raise ctx.error(
                    field,
                    f"line {first.line} {has} '{field}' but this line differs",
                    f"give '{field}' on every line or on none",
                )
        if require_equal_length and len(r.tokens) != len(first.tokens):
            raise ctx.error(
                "clean",
                f"prompt is {len(r.tokens)} tokens but line {first.line} is {len(first.tokens)} "
                "(require_equal_length=True asks for one token length)",
                "put prompts of different token lengths in separate files, or pass "
                "require_equal_length=False (batch searches accept any lengths: position-free, or "
                "positions aligned by role)",
            )


def _pad(rows: list[list[int]], pad_id: int, device: torch.device | str) -> torch.Tensor:
    """Right-pad token rows into a [B, T] long tensor."""
    t_max = max(len(r) for r in rows)
    out = torch.full((len(rows), t_max), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out.to(device)


def _build(model: HookedTransformer, records: list[PromptRecord], source: str) -> PromptSet:
    """Stack validated records into tensors on the model's device."""
    tok = model.tokenizer
    pad_id = int(tok.pad_token_id) if tok is not None and tok.pad_token_id is not None else 0
    dev = model.cfg.device or "cpu"
    has_cf = records[0].cf_tokens is not None
    has_cft = records[0].cf_target_id is not None
    return PromptSet(
        records=records,
        clean_tokens=_pad([r.tokens for r in records], pad_id, dev),
        cf_tokens=_pad([r.cf_tokens or [] for r in records], pad_id, dev) if has_cf else None,
        target_ids=torch.tensor([r.target_id for r in records], device=dev),
        cf_target_ids=torch.tensor([r.cf_target_id or 0 for r in records], device=dev)
        if has_cft
        else None,
        lengths=torch.tensor([len(r.tokens) for r in records]),
        source=source,
    )


def parse_prompts(
    text: str, model: HookedTransformer, source: str, *, require_equal_length: bool = False
) -> PromptSet:
    """Validate JSONL ``text`` (named ``source`` in errors) against ``model``'s tokenizer."""
    records: list[PromptRecord] = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        ctx = _Ctx(source, i)
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ctx.error(
                None,
                f"malformed JSON ({e.msg} at column {e.colno})",
                "write one complete JSON object per line (JSONL), with double-quoted keys and strings",
            ) from e
        records.append(_record(model, obj, ctx))
    if not records:
        raise PromptFileError(
            f"{source}: the prompt file is empty. Fix: add one JSON object per line, e.g. "
            + '{"clean": "...", "target": " Mary"}'
        )
    _check_consistent(records, source, require_equal_length)
    return _build(model, records, source)


def load_prompts(
    path_or_name: str | Path, model: HookedTransformer, *, require_equal_length: bool = False
) -> PromptSet:
    """Load and validate a bundled prompt set (``toy-ioi-small``...) or a JSONL file for ``model``."""
    source, text = _read_source(path_or_name)
    return parse_prompts(text, model, source, require_equal_length=require_equal_length)


def single_prompt(
    model: HookedTransformer,
    clean: str,
    target: str,
    counterfactual: str | None = None,
    cf_target: str | None = None,
) -> PromptSet:
    """A one-prompt PromptSet from command-line strings, validated like a file line."""
    obj: dict[str, Any] = {"clean": clean, "target": target}
    if counterfactual is not None:
        obj["counterfactual"] = counterfactual
    if cf_target is not None:
        obj["cf_target"] = cf_target
    record = _record(model, obj, _Ctx("<command line>", 1))
    return _build(model, [record], "<command line>")
