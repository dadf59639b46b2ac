"""Prompt-file format: bundled sets, tokenizer round trips, and every validation error."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformer_lens import HookedTransformer

from pathdb.models import load
from pathdb.models.ioi_data import TEMPLATES, heldout_pairs, write_bundled_prompt_sets
from pathdb.prompts import PromptFileError, bundled_prompt_sets, load_prompts, single_prompt

GOOD = {
    "clean": "When Mary and John went to the store, John gave a drink to",
    "counterfactual": "When Mary and John went to the store, Mary gave a drink to",
    "target": " Mary",
    "cf_target": " John",
}
ROLES = ["BOS", "-", "IO", "-", "S1", "-", "-", "-", "-", "-", "S2", "-", "-", "-", "END"]


@pytest.fixture(scope="module")
def model() -> HookedTransformer:
    return load("toy-ioi-2l", device="cpu")


def write(tmp_path: Path, lines: list[str], name: str = "p.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def line(**fields: object) -> str:
    return json.dumps({**GOOD, **fields})


def words(text: str) -> list[str]:
    """Independent word split (what a whitespace/punctuation pre-tokenizer must produce)."""
    return re.findall(r"\w+|[^\w\s]+", text)


# ---------------------------------------------------------------- bundled sets
def test_bundled_names() -> None:
    assert {"toy-ioi-small", "toy-ioi-large"} <= set(bundled_prompt_sets())


def test_bundled_files_are_the_deterministic_generator_output(tmp_path: Path) -> None:
    import pathdb

    for p in write_bundled_prompt_sets(tmp_path):
        bundled = Path(pathdb.__file__).parent / "data" / "prompts" / p.name
        assert p.read_bytes() == bundled.read_bytes(), p.name


def test_small_set_default_run(model: HookedTransformer) -> None:
    ps = load_prompts("toy-ioi-small", model)
    assert len(ps) == 8 and ps.equal_length
    assert ps.cf_tokens is not None
    assert ps.clean_tokens.shape == ps.cf_tokens.shape == (8, ps.n_positions)
    assert ps.cf_target_ids is not None and ps.source == "toy-ioi-small"


@pytest.mark.parametrize("name", ["toy-ioi-small", "toy-ioi-large"])
def test_bundled_round_trip_and_roles(model: HookedTransformer, name: str) -> None:
    ps = load_prompts(name, model, require_equal_length=False)
    held = heldout_pairs()
    tok = model.tokenizer
    assert tok is not None
    for i, r in enumerate(ps.records):
        assert r.roles is not None and r.cf_target is not None
        assert r.token_strs == ["<bos>", *words(r.clean)]
        assert model.to_str_tokens(r.clean) == r.token_strs
        assert int(ps.clean_tokens[i, 0]) == tok.bos_token_id
        assert r.cf_tokens is not None and len(r.cf_tokens) == len(r.tokens)
        # every target is one token, and it is the token at the IO-labelled position
        assert (
            r.target_id
            == model.to_single_token(r.target)
            == model.to_single_token(r.target.strip())
        )
        assert r.roles is not None and len(r.roles) == len(r.tokens)
        assert r.tokens[r.roles.index("IO")] == r.target_id
        assert r.tokens[r.roles.index("S1")] == r.tokens[r.roles.index("S2")] == r.cf_target_id
        assert r.roles[0] == "BOS" and r.roles[-1] == "END"
        # clean and counterfactual differ exactly at S2, where the cf repeats the IO
        diff = [j for j, (a, b) in enumerate(zip(r.tokens, r.cf_tokens, strict=True)) if a != b]
        assert diff == [r.roles.index("S2")] and r.cf_tokens[diff[0]] == r.target_id
        assert frozenset((r.target.strip(), r.cf_target.strip())) in held


def test_large_set_shape(model: HookedTransformer) -> None:
    ps = load_prompts("toy-ioi-large", model, require_equal_length=False)
    assert len(ps) >= 64
    assert len({len(r.tokens) for r in ps.records}) > 1  # several templates
    assert all(r.roles is not None and r.roles.count("IO") == 1 for r in ps.records)
    assert len({r.clean.split(" ")[0] for r in ps.records}) >= 5
    assert len(TEMPLATES) >= 6
    with pytest.raises(
        PromptFileError, match=r"toy-ioi-large, line \d+, field 'clean'.*one token length"
    ):
        load_prompts("toy-ioi-large", model, require_equal_length=True)
    assert len(load_prompts("toy-ioi-large", model)) == len(ps)  # any lengths by default


def test_unequal_lengths_are_padded_and_subset_trims(model: HookedTransformer) -> None:
    ps = load_prompts("toy-ioi-large", model, require_equal_length=False)
    assert not ps.equal_length
    for i in (0, len(ps) - 1):
        one = ps.subset(i)
        assert len(one) == 1 and one.records == [ps.records[i]]
        assert one.clean_tokens[0].tolist() == ps.records[i].tokens
        assert one.cf_tokens is not None and one.cf_tokens[0].tolist() == ps.records[i].cf_tokens
        assert int(one.target_ids[0]) == ps.records[i].target_id
        n = len(ps.records[i].tokens)
        assert model.tokenizer is not None
        assert (ps.clean_tokens[i, n:] == model.tokenizer.pad_token_id).all()


def test_file_path_without_optional_fields(model: HookedTransformer, tmp_path: Path) -> None:
    p = write(tmp_path, [json.dumps({"clean": GOOD["clean"], "target": " Mary"})] * 2)
    ps = load_prompts(p, model)
    assert ps.cf_tokens is None and ps.cf_target_ids is None and ps.records[0].roles is None
    assert torch.equal(ps.clean_tokens[0], model.to_tokens(GOOD["clean"])[0])
    assert ps.source == str(p)


def test_single_prompt(model: HookedTransformer) -> None:
    ps = single_prompt(model, GOOD["clean"], " Mary", GOOD["counterfactual"], " John")
    assert ps.cf_tokens is not None and ps.cf_target_ids is not None
    assert len(ps) == 1 and ps.clean_tokens.shape == ps.cf_tokens.shape
    assert int(ps.target_ids[0]) == model.to_single_token("Mary")
    assert int(ps.cf_target_ids[0]) == model.to_single_token("John")
    with pytest.raises(PromptFileError, match=r"<command line>, line 1, field 'counterfactual'"):
        single_prompt(
            model, GOOD["clean"], " Mary", "When Mary went to the store, Mary gave a drink to"
        )


# ---------------------------------------------------------------- validation errors
BAD_CASES: list[tuple[str, list[str], int, str | None, str]] = [
    ("malformed json", [line(), '{"clean": "When Mary", "target": '], 2, None, "malformed JSON"),
    (
        "not an object",
        [line(), line(), '["When", "Mary"]'],
        3,
        None,
        "expected a JSON object, got list",
    ),
    ("missing clean", [json.dumps({"target": " Mary"})], 1, "clean", "missing required field"),
    (
        "missing target",
        [json.dumps({"clean": GOOD["clean"]})],
        1,
        "target",
        "missing required field",
    ),
    ("empty target", [line(target="  ")], 1, "target", "empty string"),
    ("empty counterfactual", [line(counterfactual="")], 1, "counterfactual", "empty string"),
    ("clean wrong type", [line(clean=42)], 1, "clean", "expected a string, got int"),
    ("roles wrong type", [line(roles="BOS IO")], 1, "roles", "expected a list of strings"),
    (
        "target multi-token",
        [line(), line(target=" Mary John")],
        2,
        "target",
        "2 tokens.*not a single token",
    ),
    ("cf_target multi-token", [line(cf_target="John ,")], 1, "cf_target", "not a single token"),
    (
        "cf length mismatch",
        [line(counterfactual="When Mary and John went to the store, gave a drink to")],
        1,
        "counterfactual",
        "14 tokens but clean is 15",
    ),
    (
        "batch lengths differ",
        [
            line(),
            line(),
            line(
                clean="When Mary and John went to the store, John gave a drink",
                counterfactual="When Mary and John went to the store, Mary gave a drink",
            ),
        ],
        3,
        "clean",
        "14 tokens but line 1 is 15",
    ),
    (
        "roles length",
        [line(roles=ROLES[:-1])],
        1,
        "roles",
        "14 labels but the clean prompt has 15 tokens",
    ),
    (
        "unknown word in clean",
        [line(clean="When Mary and Zebediah went to the store, John gave a drink to")],
        1,
        "clean",
        "word 'Zebediah' is not in the model's vocabulary",
    ),
    ("unknown word in target", [line(target=" Zebediah")], 1, "target", "word 'Zebediah'"),
    (
        "longer than context",
        [
            line(
                clean=" ".join(["When Mary and John went to the store, and"] * 3)
                + " John gave a drink to"
            )
        ],
        1,
        "clean",
        "longer than the model's context of 32",
    ),
    (
        "optional field inconsistent",
        [line(), json.dumps({"clean": GOOD["clean"], "target": " Mary", "cf_target": " John"})],
        2,
        "counterfactual",
        "give 'counterfactual' on every line or on none",
    ),
]


@pytest.mark.parametrize(
    ("case", "lines", "lineno", "field", "problem"), BAD_CASES, ids=[c[0] for c in BAD_CASES]
)
def test_validation_errors(
    model: HookedTransformer,
    tmp_path: Path,
    case: str,
    lines: list[str],
    lineno: int,
    field: str | None,
    problem: str,
) -> None:
    p = write(tmp_path, lines, "bad.jsonl")
    with pytest.raises(PromptFileError) as info:
        load_prompts(p, model, require_equal_length=True)
    msg = str(info.value)
    assert msg.startswith(f"{p}, line {lineno}"), msg
    if field is not None:
        assert f"field '{field}'" in msg, msg
    assert re.search(problem, msg), msg
    assert "Fix:" in msg, msg


def test_blank_lines_keep_physical_line_numbers(model: HookedTransformer, tmp_path: Path) -> None:
    p = write(tmp_path, [line(), "", "   ", line(target=" Mary John")])
    with pytest.raises(PromptFileError, match=r", line 4, field 'target'"):
        load_prompts(p, model)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(model: HookedTransformer, tmp_path: Path, content: str) -> None:
    p = tmp_path / "empty.jsonl"
    p.write_text(content)
    with pytest.raises(
        PromptFileError, match=rf"{re.escape(str(p))}: the prompt file is empty\. Fix:"
    ):
        load_prompts(p, model)


def test_missing_file_names_bundled_sets(model: HookedTransformer, tmp_path: Path) -> None:
    with pytest.raises(PromptFileError, match=r"nope\.jsonl: no such prompt file.*toy-ioi-small"):
        load_prompts(tmp_path / "nope.jsonl", model)
