"""A decoder's text side: token ids to text and back, and what the CLI and the magics print
while a generation streams.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dinb.errors import DinbError

#: what ``generate`` produces when no count is given: as many as the cache holds, at most this
DEFAULT_NEW_TOKENS = 64


@dataclass(frozen=True)
class TokenCodec:
    """Text to token ids and back with a checkpoint's ``tokenizer.json``, and its end tokens."""

    tokenizer: Any
    stop_ids: tuple[int, ...]
    where: str

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise DinbError(f"no tokenizer.json in {self.where}; give the prompt as token ids (--ids 1,5,9) "
                            "or a --tokenizer directory")
        return list(self.tokenizer.encode(text).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids`` up to the first end token."""
        ids = list(ids)
        cut = next((i for i, t in enumerate(ids) if t in self.stop_ids), len(ids))
        if self.tokenizer is None:
            return " ".join(map(str, ids[:cut]))
        return str(self.tokenizer.decode(ids[:cut]))


def token_codec(model_dir: str | Path | None, config: dict[str, Any]) -> TokenCodec:
    """The tokenizer of ``model_dir`` (None without a ``tokenizer.json``) and the config's end tokens."""
    path = Path(model_dir) / "tokenizer.json" if model_dir else None
    tokenizer = None
    if path is not None and path.is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(path))
    return TokenCodec(tokenizer, tuple(config.get("eos_token_id") or ()), str(model_dir))



def default_new_tokens(max_len: int, prompt_lengths: Sequence[int]) -> int:
    """New tokens when none are asked for: what the cache holds after the longest prompt, at
    most :data:`DEFAULT_NEW_TOKENS` (and at least one)."""
    return max(1, min(DEFAULT_NEW_TOKENS, max_len - max(prompt_lengths) + 1))


def ms_per_step(timings: dict[str, Any]) -> float:
    """Milliseconds per decode step from a generation's ``timings`` (``decode_s``, ``decode_steps``)."""
    return 1000 * float(timings.get("decode_s", 0.0)) / max(int(timings.get("decode_steps", 0)), 1)


class TextStream:
    """``on_token`` for one sequence that prints its new text as the tokens come (a token may
    end in the middle of a character: only the text it completes is printed)."""

    def __init__(self, codec: TokenCodec, write: Callable[[str], Any] | None = None):
        self.codec, self.tokens = codec, []
        self.write = write or (lambda text: print(text, end="", flush=True))

    def __call__(self, row: int, token: int) -> None:
        before = self.codec.decode(self.tokens)
        self.tokens.append(token)
        self.write(self.codec.decode(self.tokens)[len(before):])
