"""Synthetic indirect-object-identification (IOI) data for the bundled toy models and prompt sets.

Each example is a clean sentence that stops right before the indirect object (IO), e.g.
``When Mary and John went to the store, John gave a drink to`` -> `` Mary``.

Counterfactual (documented choice): the *S2-swap* counterfactual. The same template and the
same first two names are kept, but the repeated subject (S2) is replaced by the IO name, so the
name that now appears only once is the original subject and the answer flips to S:
``When Mary and John went to the store, Mary gave a drink to`` -> `` John``.
Clean and counterfactual differ in one single-token word, so they tokenize to the same length
and every position aligns.

Targets are written with a leading space (`` Mary``), the GPT-2 convention; the word-level toy
tokenizer ignores whitespace, so `` Mary`` and ``Mary`` are the same single token.

Held-out pairs: a fixed set of unordered name pairs (chosen with :data:`HELDOUT_SEED`,
independent of any training seed) never appears as (IO, S) in training data, in either order.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

NAMES: tuple[str, ...] = (
    "Mary", "John", "Tom", "James", "Dan", "Sid", "Martin", "Amy", "Anna", "Alex", "Ben", "Carl",
    "Chris", "David", "Emma", "Eric", "Frank", "George", "Grace", "Henry", "Jack", "Jane", "Kate",
    "Kevin", "Laura", "Lisa", "Lucy", "Mark", "Max", "Mike", "Nancy", "Nick", "Paul", "Peter",
    "Rachel", "Rose", "Ryan", "Sam", "Sarah", "Sophie", "Steve", "Susan", "Tim", "Victor", "Will",
    "Zoe", "Adam", "Bella",
)  # fmt: skip

# {A} and {B} are the first two names (IO/S in ABBA order, S/IO in BABA order); {S2} is the
# repeated subject. Every template ends right before the indirect object.
TEMPLATES: tuple[str, ...] = (
    "When {A} and {B} went to the store , {S2} gave a drink to",
    "When {A} and {B} got a snack at the cafe , {S2} decided to give it to",
    "After {A} and {B} went to the park , {S2} handed a ball to",
    "Then , {A} and {B} had a long argument . Afterwards {S2} said to",
    "While {A} and {B} were working at the office , {S2} sent an email to",
    "Friends {A} and {B} found a ring at the beach . {S2} gave the ring to",
    "{A} and {B} went to the garden , and {S2} gave a flower to",
    "When {A} and {B} arrived at the house , {S2} threw a key to",
)

ORDERS: tuple[str, ...] = ("ABBA", "BABA")
SPECIAL_TOKENS: tuple[str, ...] = ("<bos>", "<unk>", "<pad>")
BOS = "<bos>"
HELDOUT_SEED = 20240611
N_HELDOUT_PAIRS = 120


@dataclass(frozen=True)
class IOIExample:
    """One IOI example: clean/counterfactual text, their targets and per-token role labels."""

    clean: str
    counterfactual: str
    target: str
    cf_target: str
    roles: tuple[str, ...]  # one label per token of ``clean`` including the leading <bos>
    template: int
    order: str

    def to_record(self) -> dict[str, object]:
        """The JSONL prompt-file record for this example (see :mod:`pathdb.prompts`)."""
        d = asdict(self)
        d["roles"] = list(self.roles)
        return {k: d[k] for k in ("clean", "counterfactual", "target", "cf_target", "roles")}


def vocabulary() -> list[str]:
    """Every word the generator can emit, specials first, in a fixed order (the toy vocabulary)."""
    words: list[str] = list(SPECIAL_TOKENS)
    seen = set(words)
    for w in itertools.chain(NAMES, *(t.split() for t in TEMPLATES)):
        if w.startswith("{") or w in seen:
            continue
        seen.add(w)
        words.append(w)
    return words


def heldout_pairs() -> frozenset[frozenset[str]]:
    """The fixed held-out unordered name pairs, never used as (IO, S) in training."""
    pairs = [frozenset(p) for p in itertools.combinations(NAMES, 2)]
    rng = random.Random(HELDOUT_SEED)
    return frozenset(rng.sample(pairs, N_HELDOUT_PAIRS))


def _detokenize(words: list[str]) -> str:
    """Join words into natural text (no space before punctuation; tokenization is unchanged)."""
    return " ".join(words).replace(" ,", ",").replace(" .", ".")


def make_example(template: int, order: str, io: str, s: str) -> IOIExample:
    """Build one example from a template index, a name order (ABBA/BABA), the IO and the S name."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if io == s:
        raise ValueError("IO and S must be different names")
    a, b = (io, s) if order == "ABBA" else (s, io)
    words = TEMPLATES[template].split()
    clean_words: list[str] = []
    cf_words: list[str] = []
    roles: list[str] = ["BOS"]
    for w in words:
        if w == "{A}":
            clean_words.append(a)
            cf_words.append(a)
            roles.append("IO" if order == "ABBA" else "S1")
        elif w == "{B}":
            clean_words.append(b)
            cf_words.append(b)
            roles.append("S1" if order == "ABBA" else "IO")
        elif w == "{S2}":
            clean_words.append(s)
            cf_words.append(io)
            roles.append("S2")
        else:
            clean_words.append(w)
            cf_words.append(w)
            roles.append("-")
    roles[-1] = "END"
    return IOIExample(
        clean=_detokenize(clean_words),
        counterfactual=_detokenize(cf_words),
        target=" " + io,
        cf_target=" " + s,
        roles=tuple(roles),
        template=template,
        order=order,
    )


def _sample(rng: random.Random, heldout: bool, held: frozenset[frozenset[str]]) -> IOIExample:
    """Draw one example whose name pair is (heldout=True) or is not (False) a held-out pair."""
    held_list = sorted(tuple(sorted(p)) for p in held)
    while True:
        if heldout:
            io, s = rng.sample(held_list[rng.randrange(len(held_list))], 2)
        else:
            io, s = rng.sample(NAMES, 2)
            if frozenset((io, s)) in held:
                continue
        return make_example(rng.randrange(len(TEMPLATES)), rng.choice(ORDERS), io, s)


def generate(n: int, seed: int, *, heldout: bool = False) -> list[IOIExample]:
    """``n`` examples, deterministic for ``seed``; held-out pairs only if ``heldout`` else none."""
    rng = random.Random(seed)
    held = heldout_pairs()
    return [_sample(rng, heldout, held) for _ in range(n)]


def iter_training(seed: int) -> Iterator[IOIExample]:
    """An endless deterministic stream of training examples (held-out pairs excluded)."""
    rng = random.Random(seed)
    held = heldout_pairs()
    while True:
        yield _sample(rng, False, held)


def small_prompt_set(seed: int = 0) -> list[IOIExample]:
    """8 held-out prompts of one template (template 0, 4 ABBA + 4 BABA): the default run."""
    rng = random.Random(seed)
    pairs = sorted(tuple(sorted(p)) for p in heldout_pairs())
    chosen = rng.sample(pairs, 8)
    return [
        make_example(0, ORDERS[i % 2], *(p if rng.random() < 0.5 else p[::-1]))
        for i, p in enumerate(chosen)
    ]


def large_prompt_set(seed: int = 1, per_template: int = 12) -> list[IOIExample]:
    """``per_template`` held-out prompts per template (both orders), grouped by template."""
    rng = random.Random(seed)
    pairs = sorted(tuple(sorted(p)) for p in heldout_pairs())
    out: list[IOIExample] = []
    for t in range(len(TEMPLATES)):
        for i in range(per_template):
            p = pairs[rng.randrange(len(pairs))]
            io, s = p if rng.random() < 0.5 else p[::-1]
            out.append(make_example(t, ORDERS[i % 2], io, s))
    return out


def write_jsonl(examples: list[IOIExample], path: Path) -> None:
    """Write examples as a JSONL prompt file (one record per line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex.to_record()) + "\n")


def write_bundled_prompt_sets(out_dir: Path) -> list[Path]:
    """(Re)generate ``toy-ioi-small.jsonl`` and ``toy-ioi-large.jsonl`` deterministically."""
    small, large = out_dir / "toy-ioi-small.jsonl", out_dir / "toy-ioi-large.jsonl"
    write_jsonl(small_prompt_set(), small)
    write_jsonl(large_prompt_set(), large)
    return [small, large]


if __name__ == "__main__":
    import sys

    target = (
        Path(sys.argv[1])
        if len(sys.argv) > 1
        else Path(__file__).parent.parent / "data" / "prompts"
    )
    for p in write_bundled_prompt_sets(target):
        print(p)
