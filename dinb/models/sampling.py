"""Choosing the next token on the device: greedy, or sampled with temperature, top-k and top-p.

Inside the decode program, from the logits (S, V) that every rank holds whole, one token per
sequence slot; only the token ids (S,) cross to the host. With temperature ``t > 0`` the
distribution of slot ``s`` is ``softmax(logits_s / t)`` restricted to its ``top_k`` largest
logits (0: all) and then to the smallest set of most likely tokens whose probabilities sum to at
least ``top_p`` (the nucleus; 1: all), renormalised::

    kept = {i : z_i >= z_(k)}  and  {i : sum_{j : z_j > z_i} p_j < top_p}       z = logits / t
    token = argmax_{i in kept} (z_i + g_i),   g_i ~ Gumbel(0, 1)                 (Gumbel-max)

The Gumbel-max trick draws exactly from ``softmax(z)`` over ``kept`` with one pass over the
vocabulary. The two thresholds are found by bisection over the values (24 halvings, fixed, so the
program has no data-dependent loop), never by sorting the vocabulary: on one H200 a sort of
32 x 128256 logits cost 1.4 ms a step, as much as a 3-billion-parameter model's weights.

The noise of slot ``s`` at its ``n``-th token comes from ``fold_in(fold_in(key(seed_s), row_s),
n)``: the same seed gives the same tokens whatever the rank count or the other sequences of the
batch, and every rank draws the same numbers. :func:`reference_probabilities` is the same
distribution in numpy, for tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dinb.errors import InputError

BISECTIONS = 24  # halvings of the value range: thresholds within range / 2^24 of the exact ones


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens (see the module docstring); temperature 0 is greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [("temperature", _number(self.temperature) and self.temperature >= 0,
                   "a number >= 0 (0: greedy)"),
                  ("top_k", _whole(self.top_k) and self.top_k >= 0, "a whole number >= 0 (0: no limit)"),
                  ("top_p", _number(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]"),
                  ("seed", _whole(self.seed) and 0 <= self.seed < 2**31, "a whole number in 0 .. 2^31 - 1")]
        for name, ok, what in checks:
            if not ok:
                raise InputError(f"{name}={getattr(self, name)!r}: give {what}")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _whole(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def slot_arrays(params: SamplingParams, row: int) -> tuple[list[float], list[int]]:
    """A slot's rows of the programs' ``sampling_f`` (temperature, top_p) and ``sampling_i``
    (top_k, seed, row) inputs."""
    return [float(params.temperature), float(params.top_p)], [int(params.top_k), int(params.seed), int(row)]


def pick_tokens(logits: Any, sampling_f: Any, sampling_i: Any, steps: Any,
                mode: str = "any") -> tuple[Any, Any]:
    """The token of every slot from ``logits`` (S, V), and its log-probability under the model
    (``log_softmax(logits)``, temperature 1). ``sampling_f`` (S, 2) holds each slot's temperature
    and top_p, ``sampling_i`` (S, 3) its top_k, seed and row, ``steps`` (S,) how many tokens it
    has picked (the noise's counter).

    ``mode``: ``greedy`` (argmax whatever the sampling says), ``sample`` (every slot by its
    sampling, truncation computed), or ``any`` (which of the two, decided on the device). A
    decision on the device is a conditional, which on a GPU waits for the device and stalls the
    host's launches: inside a loop of decode steps it cost 0.77 ms a step of a 3B model (3.15
    against 2.38 ms, one H200), so the decode programs come in a greedy and a sampling form and
    the host picks one."""
    import jax
    import jax.numpy as jnp

    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    temperature = sampling_f[:, 0]

    def sampled(_: Any) -> Any:
        z = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
        z = _truncated(z, sampling_i[:, 0], sampling_f[:, 1], mode == "any")
        noise = jax.vmap(_gumbel, in_axes=(0, 0, 0, None))(sampling_i[:, 1], sampling_i[:, 2], steps,
                                                           logits.shape[-1])
        return jnp.where(temperature > 0, jnp.argmax(z + noise, axis=-1).astype(jnp.int32), greedy)

    if mode == "greedy":
        tokens = greedy
    elif mode == "sample":
        tokens = sampled(None)
    else:
        tokens = jax.lax.cond(jnp.any(temperature > 0), sampled, lambda _: greedy, None)
    logprob = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]
    return tokens, logprob


def _gumbel(seed: Any, row: Any, step: Any, vocab: int) -> Any:
    import jax

    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), row), step)
    return jax.random.gumbel(key, (vocab,), dtype="float32")


def _truncated(z: Any, top_k: Any, top_p: Any, decide: bool) -> Any:
    """``z`` (S, V) with the logits outside each slot's top-k and top-p sets at -inf."""
    import jax
    import jax.numpy as jnp

    def keep(z: Any) -> Any:
        hi = jnp.max(z, axis=-1)
        lo = jnp.min(z, axis=-1)
        # top-k: the largest t with count(z >= t) >= k (k = 0: no limit)
        k = jnp.where(top_k > 0, top_k, z.shape[-1])

        def count_step(_: int, bounds: Any) -> Any:
            a, b = bounds
            mid = (a + b) / 2
            enough = jnp.sum(z >= mid[:, None], axis=-1) >= k
            return jnp.where(enough, mid, a), jnp.where(enough, b, mid)

        t_k, _ = jax.lax.fori_loop(0, BISECTIONS, count_step, (lo, hi + 1.0))
        t_k = jnp.where(top_k > 0, _snap_up(z, t_k), lo)
        zk = jnp.where(z >= t_k[:, None], z, -jnp.inf)
        # top-p: the largest t with mass(z >= t) >= top_p, the mass over the top-k set
        p = jax.nn.softmax(zk, axis=-1)

        def mass_step(_: int, bounds: Any) -> Any:
            a, b = bounds
            mid = (a + b) / 2
            enough = jnp.sum(jnp.where(zk >= mid[:, None], p, 0.0), axis=-1) >= top_p
            return jnp.where(enough, mid, a), jnp.where(enough, b, mid)

        t_p, _ = jax.lax.fori_loop(0, BISECTIONS, mass_step, (lo, hi + 1.0))
        t_p = jnp.where(top_p < 1, _snap_up(zk, t_p), lo)
        return jnp.where(zk >= t_p[:, None], zk, -jnp.inf)

    if not decide:
        return keep(z)
    truncates = jnp.any(top_k > 0) | jnp.any(top_p < 1)
    return jax.lax.cond(truncates, keep, lambda z: z, z)


def _snap_up(z: Any, t: Any) -> Any:
    """The smallest value of each row of ``z`` that is >= ``t``: the bisection's lower bound
    moved up onto the value it stands below, so that the threshold is a value of ``z`` itself."""
    import jax.numpy as jnp

    return jnp.min(jnp.where(z >= t[:, None], z, jnp.inf), axis=-1)


def reference_probabilities(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The distribution :func:`pick_tokens` draws from for one slot, in numpy float64 (sorted,
    cumulated): the reference the tests compare the draws with."""
    z = np.asarray(logits, np.float64)
    if params.temperature == 0:
        out = np.zeros_like(z)
        out[int(np.argmax(z))] = 1.0
        return out
    z = z / params.temperature
    order = np.argsort(-z, kind="stable")
    if params.top_k:
        order = order[:params.top_k]
    probs = np.exp(z[order] - z[order[0]])
    probs /= probs.sum()
    if params.top_p < 1:
        keep = int(np.searchsorted(np.cumsum(probs), params.top_p) + 1)
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    out = np.zeros_like(z)
    out[order] = probs
    return out
