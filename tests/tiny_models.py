"""A tiny random BERT and WordPiece tokenizer, built offline inside the tests."""

from __future__ import annotations

import string
from pathlib import Path

from recsys.data.synthetic import VOCABULARY


def build_tiny_bert(out_dir: Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """Write a randomly initialised BERT (hidden=32) with a fast tokenizer to `out_dir`."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    out_dir.mkdir(parents=True, exist_ok=True)
    letters = list(string.ascii_lowercase + string.digits)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.punctuation, *letters]
    vocab += [f"##{c}" for c in letters]
    vocab += sorted(set(VOCABULARY) - set(vocab))
    # transformers 5 takes the vocabulary itself (`vocab=`); `vocab_file=` is silently ignored.
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)
    tokenizer.save_pretrained(out_dir)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=hidden * 2,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(out_dir)
    return out_dir
