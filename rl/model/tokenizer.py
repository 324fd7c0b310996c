"""The project's own character-level HF fast tokenizer for the synthetic tasks.

One token per character over a fixed alphabet (digits, arithmetic symbols, letters, common
punctuation), plus <pad>, <bos>, <eos>, <unk>. Deterministic: the same ids on every
machine, so checkpoints and datasets agree. Real checkpoints bring their own tokenizer.
"""
from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]
ALPHABET = string.digits + "+-*/=()., \n:?#" + string.ascii_lowercase + string.ascii_uppercase + "_[]{}<>'\"!%$&;|\\^~`@"


def build_char_tokenizer(vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIAL + list(dict.fromkeys(ALPHABET)))}
    if vocab_size is not None and len(vocab) > vocab_size:
        raise ValueError(f"char tokenizer needs vocab_size >= {len(vocab)}, model has {vocab_size}")
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")
