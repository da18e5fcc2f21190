"""dinb's tiny adder: a small Llama-style decoder trained to add two numbers below 1000.

The directory holds a Hugging Face checkpoint (``config.json``, ``model.safetensors``,
``tokenizer.json``) made by ``tools/train_tiny_decoder.py``. Its tokens are characters: ``<pad>``
(0), ``<eos>`` (1), then ``0123456789+=``. A question writes both numbers with three digits,
``"123+045="``; the model answers with four, ``"0168"``, then the end token.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CHARS = "0123456789+="
PAD, EOS = 0, 1
SPECIAL = {"<pad>": PAD, "<eos>": EOS}


def adder_dir() -> Path:
    """The checkpoint directory (config, weights, tokenizer)."""
    return Path(__file__).resolve().parent


def encode(text: str) -> list[int]:
    """Token ids of ``text`` (characters of :data:`CHARS` only)."""
    bad = sorted({c for c in text if c not in CHARS})
    if bad:
        raise ValueError(f"{text!r}: the adder reads only {CHARS!r}, not {bad}")
    return [CHARS.index(c) + 2 for c in text]


def decode(ids: list[int]) -> str:
    """Text of token ids, up to the end token."""
    out = []
    for i in ids:
        if i == EOS:
            break
        if i >= 2:
            out.append(CHARS[i - 2])
    return "".join(out)


def question(a: int, b: int) -> tuple[str, str]:
    """``("123+045=", "0168")``: the question of ``a + b`` and its answer."""
    return f"{a:03d}+{b:03d}=", f"{a + b:04d}"


def questions(count: int = 200, seed: int = 1234) -> list[tuple[str, str]]:
    """The fixed test questions: accuracy is measured on these."""
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 1000, count), rng.integers(0, 1000, count)
    return [question(int(x), int(y)) for x, y in zip(a, b)]


def tokenizer_json() -> str:
    """The tokenizer as a Hugging Face ``tokenizers`` JSON file: one token per character."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = dict(SPECIAL, **{c: i + 2 for i, c in enumerate(CHARS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIAL))
    return json.dumps(json.loads(tok.to_str()), indent=1) + "\n"
