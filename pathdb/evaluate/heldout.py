"""The bundled held-out evaluation prompt set ``toy-ioi-heldout`` and the default evaluation set
of a run: circuits are judged on prompts the search did not see (other templates, other names).

``toy-ioi-heldout`` (56 prompts): templates 1-7 (``toy-ioi-small``, the default search set, uses
only template 0), 4 ABBA + 4 BABA prompts each, with held-out name pairs that appear in neither
``toy-ioi-small`` nor ``toy-ioi-large``. Templates differ in token length; the evaluator groups
prompts by length. Regenerate with ``python -m pathdb.evaluate.heldout`` (deterministic).
"""

from __future__ import annotations

import random
from pathlib import Path

from pathdb.models import ioi_data

HELDOUT_SET = "toy-ioi-heldout"
SEED = 12
PER_TEMPLATE = 8
TEMPLATES = tuple(range(1, len(ioi_data.TEMPLATES)))

#: bundled search prompt set -> its default held-out evaluation set
DEFAULT_HELDOUT = {"toy-ioi-small": HELDOUT_SET, "toy-ioi-large": HELDOUT_SET}


def heldout_examples() -> list[ioi_data.IOIExample]:
    """The examples of ``toy-ioi-heldout``: unused held-out name pairs on templates 1-7."""
    used = {
        frozenset((ex.target.strip(), ex.cf_target.strip()))
        for ex in ioi_data.small_prompt_set() + ioi_data.large_prompt_set()
    }
    free = sorted(tuple(sorted(p)) for p in ioi_data.heldout_pairs() if p not in used)
    rng = random.Random(SEED)
    out: list[ioi_data.IOIExample] = []
    for t in TEMPLATES:
        for i in range(PER_TEMPLATE):
            a, b = free[rng.randrange(len(free))]
            io, s = (a, b) if rng.random() < 0.5 else (b, a)
            out.append(ioi_data.make_example(t, ioi_data.ORDERS[i % 2], io, s))
    return out


def write_heldout(out_dir: Path) -> Path:
    """(Re)write ``toy-ioi-heldout.jsonl`` into ``out_dir``."""
    path = out_dir / f"{HELDOUT_SET}.jsonl"
    ioi_data.write_jsonl(heldout_examples(), path)
    return path


if __name__ == "__main__":
    print(write_heldout(Path(__file__).parent.parent / "data" / "prompts"))
