"""Where a decoder keeps its keys and values: slots of ``max_len`` positions, or a pool of blocks.

Both hold, per layer, keys (0) and values (1) of ``K`` key/value heads of ``dh`` each; they
differ in how a sequence's positions map to memory:

* **slots** ``(L, 2, S, K, T, dh)``: sequence slot ``s`` owns row ``s`` and its ``T = max_len``
  positions, used or not: memory ``S * T`` positions, whatever the sequences hold;
* **paged** ``(L, 2, B, K, b, dh)``: a pool of ``B`` blocks of ``b`` positions, and a block
  table per slot ``tables (S, N)`` (``N = ceil(max_len / b)``): position ``p`` of slot ``s``
  lies in block ``tables[s, p // b]`` at offset ``p % b``. Memory is the blocks the sequences
  hold (:mod:`dinb.runtime.block_pool` hands them out); a table entry ``B`` (past the pool)
  marks a block not held, where a write is dropped and a read is masked.

An attention window of ``W`` positions reads, for paged, the first ``ceil(W / b)`` table
entries of each slot: one gather of ``(S, ceil(W/b), K, b, dh)``, reshaped to ``(S, K, W', dh)``
with ``W' = b ceil(W / b)``, so the cost follows the window as for slots. The key/value head
axis is the same (axis 3) in both, so tensor parallelism splits both alike: each rank holds
the blocks of its own heads, and one block table serves every rank.
"""

from __future__ import annotations

from typing import Any


class SlotCache:
    """``(L, 2, S, K, T, dh)``: one row of ``max_len`` positions per sequence slot. ``rows``
    (R,): a step of those slots only (row ``i`` of its keys and values is slot ``rows[i]``; a
    row ``S``, past the last slot, writes nothing); None: every slot, in order."""

    def __init__(self, max_len: int, rows: Any = None):
        self.max_len, self.rows = max_len, rows

    def window(self, window: int) -> int:
        return window

    def write_one(self, cache: Any, layer: int, k: Any, v: Any, positions: Any, active: Any) -> Any:
        """Keys and values ``(S, K, dh)`` of one token per slot at ``positions`` (S,)."""
        import jax.numpy as jnp

        slots = jnp.arange(k.shape[0]) if self.rows is None else self.rows
        at = jnp.where(active, positions, self.max_len)  # past the row: dropped
        cache = cache.at[layer, 0, slots, :, at].set(k.astype(cache.dtype), mode="drop")
        return cache.at[layer, 1, slots, :, at].set(v.astype(cache.dtype), mode="drop")

    def read(self, cache: Any, layer: int, window: int) -> tuple[Any, Any]:
        """Keys and values ``(S, K, W, dh)`` of every slot's first ``window`` positions (of the
        ``rows``' slots: ``(R, K, W, dh)``)."""
        if self.rows is not None:
            return cache[layer, 0, self.rows, :, :window], cache[layer, 1, self.rows, :, :window]
        return cache[layer, 0, :, :, :window], cache[layer, 1, :, :, :window]

    def write_prompts(self, cache: Any, layer: int, k_t: Any, v_t: Any, slots: Any, starts: Any) -> Any:
        """Keys and values ``(R, K, P, dh)`` of ``R`` prompts into positions ``0 .. P-1`` of
        their ``slots`` (a slot past the last: a padding row, dropped)."""
        p_len = k_t.shape[2]
        cache = cache.at[layer, 0, slots, :, :p_len].set(k_t.astype(cache.dtype), mode="drop")
        return cache.at[layer, 1, slots, :, :p_len].set(v_t.astype(cache.dtype), mode="drop")


class PagedCache:
    """``(L, 2, B, K, b, dh)`` and the slots' block tables ``(S, N)`` (see the module docstring)."""

    def __init__(self, tables: Any, block_size: int):
        self.tables, self.block_size = tables, block_size

    def window(self, window: int) -> int:
        """Positions a window of ``window`` reads: whole blocks."""
        return self.block_size * -(-window // self.block_size)

    def _where(self, tables: Any, positions: Any, blocks: int) -> tuple[Any, Any]:
        """Block and offset of ``positions`` (R, P) under ``tables`` (R, N); a position past
        the table: block ``blocks`` (dropped)."""
        import jax.numpy as jnp

        index = positions // self.block_size
        block = jnp.take_along_axis(tables, jnp.minimum(index, tables.shape[1] - 1), axis=1)
        return jnp.where(index < tables.shape[1], block, blocks), positions % self.block_size

    def write_one(self, cache: Any, layer: int, k: Any, v: Any, positions: Any, active: Any) -> Any:
        import jax.numpy as jnp

        blocks = cache.shape[2]
        block, offset = self._where(self.tables, positions[:, None], blocks)
        block = jnp.where(active, block[:, 0], blocks)
        cache = cache.at[layer, 0, block, :, offset[:, 0]].set(k.astype(cache.dtype), mode="drop")
        return cache.at[layer, 1, block, :, offset[:, 0]].set(v.astype(cache.dtype), mode="drop")

    def _gather(self, cache: Any, layer: int, tables: Any, window: int) -> tuple[Any, Any]:
        """``(R, K, W', dh)`` keys and values through the first ``ceil(window / b)`` entries of
        ``tables`` (R, N); an entry past the pool reads block ``B - 1`` (masked by the caller)."""
        import jax.numpy as jnp

        n = -(-window // self.block_size)
        idx = jnp.minimum(tables[:, :n], cache.shape[2] - 1)

        def gather(kv: int) -> Any:
            g = cache[layer, kv][idx]  # (R, n, K, b, dh)
            r, _, heads, b, dh = g.shape
            return g.transpose(0, 2, 1, 3, 4).reshape(r, heads, n * b, dh)

        return gather(0), gather(1)

    def read(self, cache: Any, layer: int, window: int) -> tuple[Any, Any]:
        return self._gather(cache, layer, self.tables, window)

    def rows(self, slots: Any, blocks: int) -> Any:
        """The tables of prefill rows ``slots`` (R,); a padding row's (slot ``S``): all ``B``."""
        import jax.numpy as jnp

        s = self.tables.shape[0]
        rows = self.tables[jnp.minimum(slots, s - 1)]
        return jnp.where((slots < s)[:, None], rows, blocks)

    def write_prompts(self, cache: Any, layer: int, k_t: Any, v_t: Any, slots: Any, starts: Any) -> Any:
        """Keys and values ``(R, K, P, dh)`` of prompt tokens at positions ``starts + 0 .. P-1``."""
        import jax.numpy as jnp

        blocks = cache.shape[2]
        p_len = k_t.shape[2]
        positions = starts[:, None] + jnp.arange(p_len)[None]  # (R, P)
        block, offset = self._where(self.rows(slots, blocks), positions, blocks)
        k_p, v_p = k_t.transpose(0, 2, 1, 3), v_t.transpose(0, 2, 1, 3)  # (R, P, K, dh)
        cache = cache.at[layer, 0, block, :, offset].set(k_p.astype(cache.dtype), mode="drop")
        return cache.at[layer, 1, block, :, offset].set(v_p.astype(cache.dtype), mode="drop")

    def read_rows(self, cache: Any, layer: int, slots: Any, window: int) -> tuple[Any, Any]:
        """Keys and values ``(R, K, W', dh)`` of the prefill rows' first ``window`` positions."""
        return self._gather(cache, layer, self.rows(slots, cache.shape[2]), window)
