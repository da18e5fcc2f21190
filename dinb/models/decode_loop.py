"""A decoder's generation programs: prompts in, tokens out, the KV cache and the loop state on the
devices between calls.

Every sequence slot ``s`` of the ``S`` an export has carries four numbers, the *state*:
``tokens[s]`` (the last token picked, fed to the next step), ``positions[s]`` (where that token
goes in the cache), ``remaining[s]`` (tokens still to pick: 0 means the slot is idle) and
``counts[s]`` (tokens picked so far: the sampling noise's counter). How each slot picks is the
*sampling*: ``sampling_f`` (S, 2) its temperature and top-p, ``sampling_i`` (S, 3) its top-k,
seed and row, ``stops`` (S, E) its end tokens (-1: none). Two programs move the state::

    prefill(params, ids (R, P), lengths (R,), slots (R,), budgets (R,), state, sampling, cache)
        -> first tokens (R,), their log-probabilities (R,), logits (R, V), state, cache
    decode_k(params, state, keep (S,), sampling, cache)
        -> tokens (k, S), log-probabilities (k, S), state, cache

``prefill`` writes R prompts (a row whose slot is ``S`` is padding, written nowhere) and picks
each one's first token; its slot then has ``budgets - 1`` tokens to go (none if the first is an
end token). ``decode_k`` runs ``k`` decode steps in one call (``lax.fori_loop``), each slot with
``remaining > 0`` picking one token a step; a slot stops by itself on an end token or when its
budget is spent, then writes nothing more into the cache (its token is -1 in the output).
``keep`` false ends a slot at once (a request cancelled). Per step and slot::

    active = remaining > 0
    logits = step(tokens, positions, active, cache, W)        attention over W positions
    t = pick(logits, sampling, counts)                          dinb.models.sampling
    out = t if active else -1;  positions += active;  counts += active
    remaining = 0 if t in stops else remaining - 1              (while active)

Only the tokens (k x S int32) cross to the host, and the next call can be queued before they are
read: the state it needs is already on the devices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from dinb.models.sampling import pick_tokens

#: the state of the sequence slots, in the programs' order (each (S,) int32)
STATE = ("tokens", "positions", "remaining", "counts")
#: the sampling of the slots: name, columns, dtype
SAMPLING = (("sampling_f", 2, "float32"), ("sampling_i", 3, "int32"))
STOPS = 8  # end tokens a slot can have (generation_config's eos ids and the request's own)


def decode_program(model: Any, steps: int, window: int, sample: bool) -> Callable[..., tuple[Any, ...]]:
    """``decode_k`` (see the module docstring) for ``k = steps`` and an attention window of
    ``window`` positions (the caller picks the window that holds every slot's last position);
    ``sample`` false: every slot greedy (the caller picks this form when no slot samples: it has
    no conditional, see :func:`~dinb.models.sampling.pick_tokens`). A paged model's program
    takes the slots' block tables (S, N) after the cache."""

    def decode(params: dict[str, Any], tokens: Any, positions: Any, remaining: Any, counts: Any, keep: Any,
               sampling_f: Any, sampling_i: Any, stops: Any, cache: Any,
               tables: Any = None) -> tuple[Any, ...]:
        import jax
        import jax.numpy as jnp

        slots = tokens.shape[0]
        remaining = jnp.where(keep, remaining, 0)

        def one_step(j: Any, carry: tuple[Any, ...]) -> tuple[Any, ...]:
            tokens, positions, remaining, counts, cache, out, logprobs = carry
            logits, cache = model.step(params, tokens, positions, remaining > 0, cache, window, tables)
            state = (tokens, positions, remaining, counts)
            tokens, positions, remaining, counts, out, logprobs = advance(
                j, logits, state, out, logprobs, sampling_f, sampling_i, stops, sample)
            return tokens, positions, remaining, counts, cache, out, logprobs

        carry = (tokens, positions, remaining, counts, cache, jnp.full((steps, slots), -1, jnp.int32),
                 jnp.zeros((steps, slots), jnp.float32))
        carry = one_step(0, carry) if steps == 1 else jax.lax.fori_loop(0, steps, one_step, carry)
        tokens, positions, remaining, counts, cache, out, logprobs = carry
        return out, logprobs, tokens, positions, remaining, counts, cache

    return decode


def advance(j: Any, logits: Any, state: tuple[Any, ...], out: Any, logprobs: Any, sampling_f: Any,
            sampling_i: Any, stops: Any, sample: bool) -> tuple[Any, ...]:
    """Decode step ``j``'s tokens picked from its ``logits`` (S, V), written into ``out`` and
    ``logprobs`` (k, S), and the slots' state moved on (see the module docstring)."""
    import jax.numpy as jnp

    tokens, positions, remaining, counts = state
    active = remaining > 0
    picked, logprob = pick_tokens(logits, sampling_f, sampling_i, counts, "sample" if sample else "greedy")
    ends = jnp.any(picked[:, None] == stops, axis=-1)
    out = out.at[j].set(jnp.where(active, picked, -1))
    logprobs = logprobs.at[j].set(jnp.where(active, logprob, 0.0))
    tokens = jnp.where(active, picked, tokens)
    grow = active.astype(jnp.int32)
    remaining = jnp.where(active & ~ends, remaining - 1, 0)
    return tokens, positions + grow, remaining, counts + grow, out, logprobs


def first_tokens(logits: Any, lengths: Any, slots: Any, budgets: Any, state: tuple[Any, ...],
                 sampling_f: Any, sampling_i: Any, stops: Any) -> tuple[Any, ...]:
    """The prefilled rows' first tokens picked from their ``logits`` (R, V), their
    log-probabilities, and the state of their slots set (see the module docstring)."""
    import jax.numpy as jnp

    tokens, positions, remaining, counts = state
    at = jnp.minimum(slots, tokens.shape[0] - 1)  # a padding row reads the last slot's sampling
    first, logprob = pick_tokens(logits, sampling_f[at], sampling_i[at], jnp.zeros_like(slots))
    ends = jnp.any(first[:, None] == stops[at], axis=-1)
    tokens = tokens.at[slots].set(first, mode="drop")
    positions = positions.at[slots].set(lengths, mode="drop")
    remaining = remaining.at[slots].set(jnp.where(ends, 0, budgets - 1), mode="drop")
    counts = counts.at[slots].set(1, mode="drop")
    return first, logprob, tokens, positions, remaining, counts


def prefill_program(model: Any, attention: str = "xla",
                    window: int | None = None) -> Callable[..., tuple[Any, ...]]:
    """``prefill`` (see the module docstring); ``attention``: ``xla`` or ``cudnn`` (see
    :meth:`dinb.models.llama.LlamaDecoder.prefill_rows`). The shapes of ``ids`` fix ``R`` and
    ``P``. A paged model's program takes the block tables (S, N) after the cache; with a
    ``window``, also each row's cached prefix ``starts`` (R,) after them: ``ids`` are the rest
    of each prompt, its attention over ``window`` positions of its blocks."""

    def prefill(params: dict[str, Any], ids: Any, lengths: Any, slots: Any, budgets: Any, tokens: Any,
                positions: Any, remaining: Any, counts: Any, sampling_f: Any, sampling_i: Any, stops: Any,
                cache: Any, tables: Any = None, starts: Any = None) -> tuple[Any, ...]:

        logits, cache = model.prefill_rows(params, ids, lengths, slots, cache, attention, tables, starts,
                                           window)
        state = (tokens, positions, remaining, counts)
        first, logprob, *state = first_tokens(logits, lengths, slots, budgets, state, sampling_f, sampling_i,
                                              stops)
        return first, logprob, logits, *state, cache

    return prefill


def window_for(windows: Sequence[int], reach: int) -> int:
    """The smallest of ``windows`` that holds ``reach`` positions: the attention window of a
    call whose last step writes position ``reach - 1`` (the export's last window is max_len)."""
    return next(w for w in sorted(windows) if w >= reach)


def steps_for(decode_steps: Sequence[int], left: int) -> int:
    """The decode steps of the next call when a slot has ``left`` tokens to pick: the most the
    export has that ``left`` fills, else 1 (no step is run for nothing near the end)."""
    return max(k for k in decode_steps if k == 1 or k <= left)


def call_plan(prompt_len: int, new_tokens: int, windows: Sequence[int],
              decode_steps: Sequence[int]) -> list[tuple[int, int]]:
    """``(steps, window)`` of each decode call that generates ``new_tokens`` for one prompt of
    ``prompt_len`` tokens with no end token met. The prefill picks the first token, so the
    calls pick ``new_tokens - 1``; a call of k steps from position p attends over
    ``window_for(windows, p + k)`` positions, so its cost follows the tokens in use."""
    position, left, plan = prompt_len, new_tokens - 1, []
    while left > 0:
        k = steps_for(decode_steps, left)
        plan.append((k, window_for(windows, position + k)))
        position, left = position + k, left - k
    return plan
