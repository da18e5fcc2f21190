"""A decoder's generation programs cut into pipeline stages: each stage its layers and their cache.

``S`` stages share the ``L`` layers, stage ``s`` running layers ``a_s .. b_s - 1`` with a cache of
those layers only, ``(b_s - a_s, 2, ...)``. The first stage also holds the embedding, the last the
final norm and the logits head, and picks the tokens. One decode step of every slot::

    x_0     = layers[a_0:b_0](embed(tokens))                 stage 0
    x_s     = layers[a_s:b_s](x_{s-1})                       stage s: x (S, 1, h) from stage s - 1
    tokens  = pick(logits(x_{S-1}))                          the last stage, with the state moved on
                                                             (dinb.models.decode_loop.advance)
    state   -> every stage                                   the next step's tokens and positions

so the activations ``(S, 1, h)`` travel forward, stage to stage, and the slots' state (``S`` x 4
int32: tokens, positions, remaining, counts) travels back from the last stage to the others for
the next step. A prefill does the same with the prompts' activations ``(R, P, h)``; the last
stage takes each prompt's row after its last token and picks the first tokens.

Every stage's program takes the same arguments, so the runtime drives them alike::

    decode: (params, x, tokens, positions, remaining, counts, sampling_f, sampling_i, stops, cache[, tables])
        -> (x, cache)                                               a stage before the last
        -> (token (S,), log-probability (S,), state..., cache)      the last (logits: (logits, cache))
    prefill: (params, x, lengths, slots, budgets, state..., sampling..., cache[, tables[, starts]])
        -> (x, cache) | (first (R,), log-probability (R,), logits (R, V), state..., cache)

``x`` is the token ids (S,) or the prompts (R, P) for the first stage (its embedding makes the
activations), the previous stage's activations for the others. ``model`` is a
:class:`~dinb.models.llama.LlamaDecoder` (the stage's ranks as one SPMD program) or a
:class:`~dinb.models.llama_rank.RankModel` (each rank's own steps, the all-reduces by MPI).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dinb.models.decode_loop import advance, first_tokens


def stage_decode(model: Any, layers: range, first: bool, last: bool, window: int,
                 sample: bool | None) -> Callable[..., tuple[Any, ...]]:
    """One decode step of stage ``layers`` (see the module docstring); ``sample`` None: the last
    stage gives the logits (the decode step with logits), else picks the tokens (greedy when
    false, each slot's sampling when true)."""

    def decode(params: dict[str, Any], x: Any, tokens: Any, positions: Any, remaining: Any, counts: Any,
               sampling_f: Any, sampling_i: Any, stops: Any, cache: Any,
               tables: Any = None) -> tuple[Any, ...]:
        import jax.numpy as jnp

        active = remaining > 0 if sample is not None else jnp.ones(tokens.shape, bool)
        if first:
            x = model.embed(params, tokens)[:, None]
        x, cache = model.decode_layers(params, layers, x, positions, active, cache, window, tables)
        if not last:
            return x, cache
        logits = model.logits(params, x[:, 0])
        if sample is None:
            return logits, cache
        slots = tokens.shape[0]
        out, logprobs = jnp.full((1, slots), -1, jnp.int32), jnp.zeros((1, slots), jnp.float32)
        *state, out, logprobs = advance(0, logits, (tokens, positions, remaining, counts), out, logprobs,
                                        sampling_f, sampling_i, stops, sample)
        return out[0], logprobs[0], *state, cache

    return decode


def stage_decode_rows(model: Any, layers: range, first: bool, last: bool, window: int,
                      sample: bool) -> Callable[..., tuple[Any, ...]]:
    """One decode step of stage ``layers`` for the slots ``rows`` (R,) only, a group of the
    slots that follow each other through the stages; a row ``S`` (past the last slot) is
    padding, computed and dropped::

        decode_rows(params, x, rows, tokens, positions, remaining, counts, sampling..., cache[, tables])
            -> (x (R, 1, h), cache) | (token (S,), log-probability (S,), state..., cache)

    The state and the tokens are every slot's (S,), as :func:`stage_decode`'s; the rows'
    entries are moved on and the others left as they are (their token -1), so each group's
    passes need only its own previous pass. The activations ``x`` are the rows' only."""

    def decode(params: dict[str, Any], x: Any, rows: Any, tokens: Any, positions: Any, remaining: Any,
               counts: Any, sampling_f: Any, sampling_i: Any, stops: Any, cache: Any,
               tables: Any = None) -> tuple[Any, ...]:
        import jax.numpy as jnp

        def take(a: Any, fill: int = 0) -> Any:
            return a.at[rows].get(mode="fill", fill_value=fill)

        state = tuple(take(a) for a in (tokens, positions, remaining, counts))  # padding: remaining 0
        if first:
            x = model.embed(params, state[0])[:, None]
        x, cache = model.decode_layers(params, layers, x, state[1], state[2] > 0, cache, window, tables, rows)
        if not last:
            return x, cache
        logits = model.logits(params, x[:, 0])
        n = rows.shape[0]
        out, logprobs = jnp.full((1, n), -1, jnp.int32), jnp.zeros((1, n), jnp.float32)
        *moved, out, logprobs = advance(0, logits, state, out, logprobs, take(sampling_f), take(sampling_i),
                                        take(stops, -1), sample)
        full = [a.at[rows].set(m, mode="drop") for a, m in zip((tokens, positions, remaining, counts), moved)]
        picked = jnp.full(tokens.shape, -1, jnp.int32).at[rows].set(out[0], mode="drop")
        logprob = jnp.zeros(tokens.shape, jnp.float32).at[rows].set(logprobs[0], mode="drop")
        return picked, logprob, *full, cache

    return decode


def stage_prefill(model: Any, layers: range, first: bool, last: bool,
                  window: int | None = None) -> Callable[..., tuple[Any, ...]]:
    """The prefill of stage ``layers`` (see the module docstring); ``window``: the rest of each
    prompt after a cached prefix, over ``window`` positions of its blocks (``starts`` given)."""

    def prefill(params: dict[str, Any], x: Any, lengths: Any, slots: Any, budgets: Any, tokens: Any,
                positions: Any, remaining: Any, counts: Any, sampling_f: Any, sampling_i: Any, stops: Any,
                cache: Any, tables: Any = None, starts: Any = None) -> tuple[Any, ...]:
        if first:
            x = model.embed(params, x)
        x, cache = model.prompt_layers(params, layers, x, slots, cache, "xla", tables, starts, window)
        if not last:
            return x, cache
        logits = model.logits(params, model.last_tokens(x, lengths, starts))
        state = (tokens, positions, remaining, counts)
        picked, logprob, *state = first_tokens(logits, lengths, slots, budgets, state, sampling_f, sampling_i,
                                               stops)
        return picked, logprob, logits, *state, cache

    return prefill
