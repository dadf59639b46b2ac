"""Role-aligned positions: one position axis for prompts of different token lengths.

A prompt with role labels (``BOS``, ``IO``, ``S1``, ``S2``, ``END``, ``-`` for unlabelled tokens)
gives each of its tokens a *position name*: its role, or for an unlabelled token a name derived
from the next labelled token after it (``S2-1``: the token just before ``S2``), or from the last
labelled token when none follows (``END+1``). Counting towards the next role keeps the filler of
templates that differ in the order of two earlier roles (IOI's ABBA / BABA) aligned: in
``When IO and S1 went to the store, S2 gave a drink to END`` the tokens after ``S1`` are
``S2-6`` .. ``S2-1`` and ``END-3`` .. ``END-1`` in both orders. A run's axis is the union
of its prompts' names, ordered by mean token index; a positional node at axis position ``s``
stands for the token named ``names[s]`` in each prompt, so ``a3.h0<q>@END`` is the query of head
a3.h0 at each prompt's END token whatever its index (DESIGN.md section 7, docs/semantics.md).

A prompt that lacks a name has no such token, so every path through it scores 0 on that prompt;
a key/value source is allowed for a query position when some prompt has both, the source at or
before the query (causal attention), and a path scores 0 on prompts where it is not.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

UNLABELLED = "-"
ROLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class RoleError(ValueError):
    """Invalid role labels or an unknown role name; the message says what to change."""


def check_roles(roles: Sequence[str]) -> None:
    """Raise :class:`RoleError` unless every label is ``-`` or a unique identifier-like name."""
    seen: dict[str, int] = {}
    for i, role in enumerate(roles):
        if role == UNLABELLED:
            continue
        if not ROLE_NAME.match(role):
            raise RoleError(
                f"role {role!r} (token {i}) is not a name; use letters, digits and '_', starting "
                "with a letter (e.g. S2, END), or '-' for an unlabelled token"
            )
        if role in seen:
            raise RoleError(
                f"role {role!r} labels tokens {seen[role]} and {i}; each role names one token, so "
                "give them distinct names (e.g. S1, S2)"
            )
        seen[role] = i
    if not seen:
        raise RoleError("no token has a role label; label at least the last token (e.g. END)")


def token_names(roles: Sequence[str]) -> list[str]:
    """Position name of every token: its role, else ``ROLE-d`` (``d`` tokens before the next
    labelled token), else ``ROLE+d`` (``d`` tokens after the last labelled token)."""
    check_roles(roles)
    labelled = [i for i, r in enumerate(roles) if r != UNLABELLED]
    names: list[str] = []
    for i, role in enumerate(roles):
        if role != UNLABELLED:
            names.append(role)
            continue
        after = [j for j in labelled if j > i]
        if after:
            names.append(f"{roles[after[0]]}-{after[0] - i}")
        else:
            before = labelled[-1]
            names.append(f"{roles[before]}+{i - before}")
    return names


@dataclass(frozen=True)
class PositionAxis:
    """The role positions of a prompt set: names in axis order and each prompt's token layout."""

    names: tuple[str, ...]  # axis position -> position name
    layouts: tuple[tuple[int, ...], ...]  # per prompt: token index -> axis position

    @staticmethod
    def from_roles(prompt_roles: Sequence[Sequence[str]]) -> PositionAxis:
        """The axis of prompts with these role labels (names ordered by mean token index, then name)."""
        per_prompt = [token_names(r) for r in prompt_roles]
        where: dict[str, list[int]] = {}
        for names in per_prompt:
            for i, n in enumerate(names):
                where.setdefault(n, []).append(i)
        order = sorted(where, key=lambda n: (sum(where[n]) / len(where[n]), n))
        index = {n: s for s, n in enumerate(order)}
        layouts = tuple(tuple(index[n] for n in names) for names in per_prompt)
        return PositionAxis(tuple(order), layouts)

    @staticmethod
    def right_aligned(lengths: Sequence[int]) -> PositionAxis:
        """The axis of prompts without roles aligned by offset from their last token (``END``,
        ``END-1``, ...): the positions mean patching averages on for mixed lengths without roles."""
        return PositionAxis.from_roles([[UNLABELLED] * (int(n) - 1) + ["END"] for n in lengths])

    def __len__(self) -> int:
        """Number of axis positions."""
        return len(self.names)

    def kv_sources(self) -> tuple[tuple[int, ...], ...]:
        """Per query position, the source positions some prompt has at or before it."""
        allowed: list[set[int]] = [set() for _ in self.names]
        for layout in self.layouts:
            for q_tok, q in enumerate(layout):
                allowed[q].update(layout[: q_tok + 1])
        return tuple(tuple(sorted(a)) for a in allowed)

    def groups(self) -> list[tuple[list[int], tuple[int, ...]]]:
        """Prompts sharing one layout ``(prompt indices, layout)``, in order of first prompt."""
        by_layout: dict[tuple[int, ...], list[int]] = {}
        for i, layout in enumerate(self.layouts):
            by_layout.setdefault(layout, []).append(i)
        return [(ix, layout) for layout, ix in by_layout.items()]

    def resolve(self, spec: str | int) -> int:
        """The axis position of a name (or of an axis index given as an int / digits)."""
        text = str(spec).strip()
        if text.isdigit() and int(text) < len(self.names):
            return int(text)
        if text in self.names:
            return self.names.index(text)
        roles = [n for n in self.names if "+" not in n and "-" not in n]
        raise RoleError(
            f"unknown role position {text!r}; the prompts' roles are {', '.join(roles)} "
            "(an unlabelled token is named by its distance to the next role, e.g. S2-1)"
        )

    def last(self) -> int:
        """The axis position of every prompt's last token; refused when the prompts disagree."""
        ends = sorted({layout[-1] for layout in self.layouts})
        if len(ends) > 1:
            raise RoleError(
                "the prompts' last tokens have different roles ("
                + ", ".join(self.names[e] for e in ends)
                + "); choose the root with --root-position ROLE"
            )
        return ends[0]
