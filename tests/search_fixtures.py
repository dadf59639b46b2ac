"""Small float64 random models and prompt sets shared by the search and runner tests."""

from __future__ import annotations

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from pathdb.prompts import PromptRecord, PromptSet


def random_prompt_set(d_vocab: int, batch: int, seq: int, seed: int) -> PromptSet:
    """Random clean/counterfactual token batches with random targets (no tokenizer needed)."""
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, d_vocab, (batch, seq), generator=g)
    cf = torch.randint(0, d_vocab, (batch, seq), generator=g)
    tgt = torch.randint(0, d_vocab, (batch,), generator=g)
    cft = torch.randint(0, d_vocab, (batch,), generator=g)
    return prompt_set_of(toks, cf, tgt, cft, "random")


def prompt_set_of(
    toks: torch.Tensor, cf: torch.Tensor, tgt: torch.Tensor, cft: torch.Tensor, name: str
) -> PromptSet:
    """A :class:`PromptSet` of equal-length token batches (tokens named by their ids)."""
    batch, seq = toks.shape
    recs = [
        PromptRecord("c", "cf", "t", "u", None, toks[i].tolist(), [str(t) for t in toks[i].tolist()],
                     cf[i].tolist(), int(tgt[i]), int(cft[i]), i + 1)
        for i in range(batch)
    ]  # fmt: skip
    return PromptSet(recs, toks, cf, tgt, cft, torch.full((batch,), seq), name)


def random_model(
    seed: int = 3, *, n_layers: int = 2, d_model: int = 24, n_heads: int = 2, d_vocab: int = 17
) -> HookedTransformer:
    """A float64 GPT-2-style HookedTransformer with random weights."""
    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(
        n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_model // n_heads,
        d_mlp=2 * d_model, n_ctx=8, d_vocab=d_vocab, act_fn="gelu", normalization_type="LN",
        dtype=torch.float64, seed=seed,
    )  # fmt: skip
    model = HookedTransformer(cfg)
    model.eval()
    return model
