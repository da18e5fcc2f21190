"""Choosing the next token from logits: greedy, or sampled with temperature, top-k and top-p.

Sampling runs on the host, in numpy, from the logits every rank holds whole. Each sequence has
its own generator seeded by ``(seed, row)``: the same seed gives the same tokens whatever the
rank count or the other sequences of the batch, and every rank draws the same numbers.

With temperature ``t > 0`` the probabilities are ``softmax(logits / t)`` restricted to the
``top_k`` largest logits (0: all) and then to the smallest set of most likely tokens whose
probabilities sum to at least ``top_p`` (the nucleus; 1: all), renormalised.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dinb.errors import InputError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens (see the module docstring); temperature 0 is greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [("temperature", self.temperature >= 0, "a number >= 0 (0: greedy)"),
                  ("top_k", self.top_k >= 0, "a whole number >= 0 (0: no limit)"),
                  ("top_p", 0 < self.top_p <= 1, "a number in (0, 1]"),
                  ("seed", self.seed >= 0, "a whole number >= 0")]
        for name, ok, what in checks:
            if not ok:
                raise InputError(f"{name}={getattr(self, name)!r}: give {what}")


class Sampler:
    """Picks tokens for one sequence (its own random generator)."""

    def __init__(self, params: SamplingParams, row: int = 0):
        self.params = params
        self.rng = np.random.default_rng([params.seed, row])

    def pick(self, logits: np.ndarray) -> int:
        p = self.params
        logits = np.asarray(logits, np.float64)
        if p.temperature == 0:
            return int(np.argmax(logits))
        scaled = logits / p.temperature
        order = np.argsort(-scaled, kind="stable")
        if p.top_k:
            order = order[:p.top_k]
        probs = np.exp(scaled[order] - scaled[order[0]])
        probs /= probs.sum()
        if p.top_p < 1:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        return int(order[self.rng.choice(len(order), p=probs)])
