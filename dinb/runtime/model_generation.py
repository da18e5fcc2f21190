"""A decoder's side of :class:`dinb.runtime.model.Model`: generating over the KV cache that
:class:`~dinb.runtime.generation.DecodeRun` keeps on the devices (prefill, decode steps, the
token loop, streaming).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dinb.errors import (
    DinbError,
    InputError,
)
from dinb.runtime.generation import DecodeRun
from dinb.runtime.sampling import SamplingParams


class Generating:
    """The generation methods of :class:`Model` (its ``_gen`` is the decoder's run)."""

    # ---- generation ----------------------------------------------------------------------------
    def generate(self, prompt_ids: Any, max_new_tokens: int = 32, *, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_ids: Sequence[int] = (),
                 on_token: Callable[[int, int], None] | None = None) -> list[int] | list[list[int]]:
        """New tokens after a prompt (a list of token ids), or after each of a list of prompts
        (at most the export's sequence slots), from a decoder's export.

        Greedy when ``temperature`` is 0; else sampled (``top_k``, ``top_p``, see
        :mod:`dinb.runtime.sampling`) with a generator per prompt seeded by ``seed``: the same
        seed gives the same tokens on every rank count. A prompt stops after ``max_new_tokens``
        or after a token of ``stop_ids`` (which is kept). ``on_token(row, token)`` is called as
        each token is picked (streaming). Every rank must make the same call.
        """
        gen = self._decoder("generate")
        return gen.generate(prompt_ids, max_new_tokens, SamplingParams(temperature, top_k, top_p, seed),
                            stop_ids, on_token)

    def generate_stream(self, prompt_ids: Sequence[int], max_new_tokens: int = 32, **sampling: Any) -> Any:
        """The new tokens of one prompt as they are picked (an iterator); ``generate``'s options."""
        gen = self._decoder("generate_stream")
        stop_ids = sampling.pop("stop_ids", ())
        prompts, single = gen.prompts_of(prompt_ids)
        if not single:
            raise InputError("generate_stream takes one prompt (a list of token ids); use generate's "
                             "on_token for several")
        steps = gen.steps(prompts, max_new_tokens, SamplingParams(**sampling), stop_ids)
        return (token for _, token in steps)

    def prefill(self, slot: int, prompt_ids: Sequence[int]) -> np.ndarray:
        """Run the prefill program: ``prompt_ids`` into sequence slot ``slot`` of the KV cache;
        returns the logits (vocabulary,) after the prompt's last token. (``generate`` calls it.)"""
        gen = self._decoder("prefill")
        if not 0 <= slot < gen.slots:
            raise InputError(f"slot {slot}: the export has slots 0 .. {gen.slots - 1}")
        prompts, _ = gen.prompts_of([list(prompt_ids)])
        return gen.prefill(slot, prompts[0])

    def decode_step(self, tokens: Sequence[int], positions: Sequence[int]) -> np.ndarray:
        """Run one decode step: ``tokens[s]`` of every slot ``s`` at ``positions[s]``; returns the
        logits (slots, vocabulary). The cache is updated in place."""
        gen = self._decoder("decode_step")
        t, p = np.asarray(tokens), np.asarray(positions)
        if t.shape != (gen.slots,) or p.shape != (gen.slots,):
            raise InputError(f"decode_step takes one token and one position per slot, ({gen.slots},) each; "
                             f"got {list(t.shape)} and {list(p.shape)}")
        if p.min() < 0 or p.max() >= gen.max_len:
            raise InputError(f"positions must lie in 0 .. {gen.max_len - 1} (the cache's length)")
        return gen.decode(t, p)

    def kv_cache(self, slot: int, length: int) -> np.ndarray:
        """The keys and values of slot ``slot`` at positions ``0 .. length-1``, gathered from every
        rank: ``(layers, 2, kv_heads, length, head_dim)``."""
        return self._decoder("kv_cache").cache_slot(slot, length)

    def generation_info(self) -> dict[str, Any] | None:
        """A decoder's ``slots``, ``max_len``, prompt ``buckets``, ``vocab``, the KV ``cache`` (shape, dtype,
        layout) and the ``cache_bytes`` each local rank holds; None for other exports."""
        self._check_built()
        if self._gen is None:
            return None
        g = self._gen
        return {"slots": g.slots, "max_len": g.max_len, "buckets": list(g.buckets), "vocab": g.vocab,
                "cache": g.cache_meta,
                "cache_bytes": dict(g.cache_bytes), "timings": dict(g.timings)}

    def _decoder(self, what: str) -> DecodeRun:
        self._check_built()
        if self._gen is None:
            raise DinbError(f"{what}: {self.model_name!r} is not a decoder's export; generate runs models "
                            "that generate text (--model llama)")
        return self._gen
