"""Word-level tokenizer for the bundled toy models, wrapped so TransformerLens can use it.

The raw tokenizer is a ``tokenizers`` WordLevel model with a whitespace/punctuation
pre-tokenizer (``Whitespace``: words and punctuation runs are separate tokens, spaces are
dropped). A post-processor prepends ``<bos>`` as GPT-2 does in TransformerLens, and the HF
wrapper declares ``add_bos_token=True`` so TransformerLens neither re-downloads a tokenizer
nor prepends a second BOS. Because whitespace is dropped, `` Mary`` and ``Mary`` are the same
single token (targets in prompt files are written with a leading space, GPT-2 style).
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

BOS_TOKEN = "<bos>"
UNK_TOKEN = "<unk>"
PAD_TOKEN = "<pad>"


def build_word_tokenizer(words: list[str]) -> Tokenizer:
    """A WordLevel tokenizer over ``words`` (must start with <bos>, <unk>, <pad>)."""
    if words[:3] != [BOS_TOKEN, UNK_TOKEN, PAD_TOKEN]:
        raise ValueError("the vocabulary must start with <bos>, <unk>, <pad>")
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN])]
    )
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    tok.add_special_tokens([BOS_TOKEN, UNK_TOKEN, PAD_TOKEN])
    return tok


def wrap_for_transformer_lens(tok: Tokenizer, name: str) -> PreTrainedTokenizerFast:
    """Wrap a raw tokenizer as a HF fast tokenizer that ``HookedTransformer(tokenizer=...)`` accepts."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=BOS_TOKEN,  # like GPT-2's <|endoftext|>, one token serves as BOS and EOS
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        add_bos_token=True,  # the post-processor already prepends <bos>
        name_or_path=name,  # TransformerLens reads it; never used to download anything
        padding_side="right",
    )


def load_word_tokenizer(path: Path, name: str) -> PreTrainedTokenizerFast:
    """Load a saved ``tokenizer.json`` and wrap it for TransformerLens."""
    return wrap_for_transformer_lens(Tokenizer.from_file(str(path)), name)
