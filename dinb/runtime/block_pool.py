"""The blocks of a paged KV cache, handed out on the host: one pool per job, the same on every rank.

A paged export's cache is a pool of ``B`` *blocks* of ``b`` positions each (see
:mod:`dinb.models.kv_cache`). A sequence holds a *block table*, the blocks of its positions in
order: position ``p`` lies in block ``table[p // b]`` at offset ``p % b``. So a sequence of
``n`` positions takes ``ceil(n / b)`` blocks, whatever the export's ``max_len``: the memory is
set by the tokens held, and only each sequence's last block is part empty.

Blocks are taken *as the tokens come* (vLLM's policy): a sequence joins when the pool has the
blocks of its prompt and of its first decode call, and before each decode call every sequence
in flight gets the blocks that the call's positions reach (:meth:`BlockPool.make_room`). When
the pool runs out, the sequence that joined last is *preempted*: its blocks go back and it waits
at the front of the queue, to be prefilled again from its prompt and the tokens it had picked
(its cached prefix found again if it is still in the pool). The oldest sequence always goes on,
so every admitted sequence finishes; only the last block of each sequence is part empty::

    held = sum_s ceil(n_s / b) b  <  sum_s n_s + S b       S sequences, n_s positions each
                                                          (those the next call writes included)

**Prefix caching.** A full block of a prompt is named by a digest of its parent block's digest
and its ``b`` tokens, so equal digests mean equal tokens at equal positions, all the way back to
the prompt's start: the keys and values in the block are the same. A prompt whose first blocks
are already in the pool shares them (a reference count per block) and prefills only the rest::

    digest_0 = H(root, tokens[0:b]);  digest_i = H(digest_{i-1}, tokens[i b:(i+1) b])

A block whose last sequence finished keeps its digest and stays in the pool, *evictable*; when
the free blocks run out, the least recently used of them is taken. The last prompt token is
always prefilled again (its logits pick the first new token), so a shared block is never
written: at most ``(len(prompt) - 1) // b`` blocks are shared.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dinb.errors import InputError

ROOT = b"dinb-prefix"


def blocks_for(positions: int, block_size: int) -> int:
    """Blocks that hold ``positions`` positions."""
    return -(-positions // block_size)


def block_digest(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The name of a full block: its parent's digest and its tokens."""
    return hashlib.blake2b(parent + np.asarray(tokens, "<i8").tobytes(), digest_size=16).digest()


@dataclass
class Admitted:
    """A sequence's place in the pool: its block table and how much of its prompt was cached."""

    table: list[int]
    cached_tokens: int  # prompt positions whose keys and values are already in shared blocks
    digests: list[bytes] = field(default_factory=list)  # of its prompt's full blocks


class BlockPool:
    """``blocks`` blocks of ``block_size`` positions (see the module docstring)."""

    def __init__(self, blocks: int, block_size: int, prefix_caching: bool = True):
        self.blocks, self.block_size, self.prefix_caching = int(blocks), int(block_size), prefix_caching
        self.free: deque[int] = deque(range(self.blocks))
        self.refs = [0] * self.blocks
        self.by_digest: dict[bytes, int] = {}
        self.digest_of: dict[int, bytes] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced: oldest first
        self.seqs: dict[Hashable, Admitted] = {}
        self.hits = self.queries = 0  # prefix blocks found, prefix blocks looked for
        self.evictions = self.preemptions = 0

    # ---- what can be held ----------------------------------------------------------------------
    def check_fits(self, positions: int, what: str = "a sequence") -> None:
        """A clear error for a sequence that could never fit, even in an empty pool."""
        need = blocks_for(positions, self.block_size)
        if need > self.blocks:
            raise InputError(
                f"{what} needs {positions} cache positions = {need} blocks of {self.block_size}, and the "
                f"export's pool has {self.blocks} blocks ({self.blocks * self.block_size} positions); "
                f"ask for fewer tokens or export with --cache-blocks {need} or more")

    @property
    def available(self) -> int:
        """Blocks that a new sequence can take: the free ones and the evictable ones."""
        return len(self.free) + len(self.evictable)

    @property
    def in_use(self) -> int:
        """Blocks some sequence holds."""
        return self.blocks - self.available

    def _prefix(self, prompt: Sequence[int]) -> tuple[list[bytes], list[int]]:
        """The digests of the prompt's full blocks, and the blocks of its cached prefix."""
        b = self.block_size
        digests, parent = [], ROOT
        for i in range(len(prompt) // b):
            parent = block_digest(parent, prompt[i * b:(i + 1) * b])
            digests.append(parent)
        shared = []
        if self.prefix_caching:
            for d in digests[:(len(prompt) - 1) // b]:
                block = self.by_digest.get(d)
                if block is None:
                    break
                shared.append(block)
        return digests, shared

    def can_admit(self, prompt: Sequence[int], positions: int) -> bool:
        """Whether a sequence of ``prompt`` and ``positions`` positions in all fits now."""
        _, shared = self._prefix(prompt)
        fresh = blocks_for(positions, self.block_size) - len(shared)
        return fresh <= len(self.free) + len([b for b in self.evictable if b not in shared])

    # ---- a sequence's life -------------------------------------------------------------------
    def admit(self, seq: Hashable, prompt: Sequence[int], positions: int) -> Admitted | None:
        """The blocks of a sequence's first ``positions`` positions (``prompt`` and what its first
        decode call writes; its cached prefix shared); None when they are not free now."""
        if seq in self.seqs:
            raise InputError(f"sequence {seq!r} holds blocks already")
        if not self.can_admit(prompt, positions):
            return None
        digests, shared = self._prefix(prompt)
        self.queries += (len(prompt) - 1) // self.block_size if self.prefix_caching else 0
        self.hits += len(shared)
        for block in shared:
            self._take(block)
        table = shared + [self._fresh() for _ in range(blocks_for(positions, self.block_size) - len(shared))]
        admitted = Admitted(table, len(shared) * self.block_size, digests)
        self.seqs[seq] = admitted
        return admitted

    def prefilled(self, seq: Hashable) -> None:
        """The sequence's prompt is in its blocks: its full blocks may now be shared."""
        if not self.prefix_caching:
            return
        admitted = self.seqs[seq]
        for block, digest in zip(admitted.table, admitted.digests):
            if digest not in self.by_digest:
                self.by_digest[digest], self.digest_of[block] = block, digest

    def release(self, seq: Hashable) -> None:
        """The sequence finished (or was cancelled): its blocks go back; those that hold a
        cached prefix stay findable until they are evicted."""
        admitted = self.seqs.pop(seq, None)
        if admitted is None:
            return
        for block in reversed(admitted.table):  # a prefix's last blocks are evicted first
            self.refs[block] -= 1
            if self.refs[block] == 0 and block in self.digest_of:
                self.evictable[block] = None
        self.free.extend(b for b in admitted.table if self.refs[b] == 0 and b not in self.digest_of)

    def grow(self, seq: Hashable, positions: int) -> bool:
        """Blocks appended to the sequence's table until it holds ``positions`` positions; False
        (and nothing taken) when the pool does not have them now."""
        table = self.seqs[seq].table
        more = blocks_for(positions, self.block_size) - len(table)
        if more > self.available:
            return False
        table.extend(self._fresh() for _ in range(more))
        return True

    def fits(self, needs: Sequence[tuple[Hashable, int]]) -> bool:
        """Whether every ``(sequence, positions)`` of ``needs`` can grow now, nobody preempted."""
        more = sum(max(0, blocks_for(n, self.block_size) - len(self.seqs[s].table)) for s, n in needs)
        return more <= self.available

    def make_room(self, needs: Sequence[tuple[Hashable, int]]) -> list[Hashable]:
        """Grow each ``(sequence, positions)`` of ``needs``, given oldest first; while the pool
        cannot, the newest of them is preempted (released). The preempted, newest first."""
        order, want = [seq for seq, _ in needs], dict(needs)
        preempted: list[Hashable] = []
        grown = 0
        while grown < len(order):
            if self.grow(order[grown], want[order[grown]]):
                grown += 1
                continue
            victim = order.pop()  # the newest; the sequence that did not fit, when it is the newest
            self.release(victim)
            self.preemptions += 1
            preempted.append(victim)
        return preempted

    def _take(self, block: int) -> None:
        if self.refs[block] == 0:
            self.evictable.pop(block, None)
        self.refs[block] += 1

    def _fresh(self) -> int:
        if self.free:
            block = self.free.popleft()
        else:
            block, _ = self.evictable.popitem(last=False)
            del self.by_digest[self.digest_of.pop(block)]
            self.evictions += 1
        self.refs[block] = 1
        return block

    # ---- what the programs and the pictures read -------------------------------------------------
    def stats(self) -> dict[str, int]:
        """Blocks in use, free (evictable included), cached (evictable), prefix blocks hit and
        looked for, evictions, preemptions."""
        return {"blocks": self.blocks, "block_size": self.block_size, "in_use": self.in_use,
                "free": self.available, "cached": len(self.evictable), "prefix_hits": self.hits,
                "prefix_queries": self.queries, "evictions": self.evictions,
                "preemptions": self.preemptions}

    def snapshot(self) -> dict[str, Any]:
        """The pool now, as plain data (what :mod:`dinb.explore.paged` draws): ``blocks``,
        ``block_size``, each sequence's ``tables`` and the blocks it found ``cached`` at its
        start, each block's ``refs``, the ``evictable`` blocks (oldest first) and the ``free``."""
        return {"blocks": self.blocks, "block_size": self.block_size,
                "tables": {str(seq): list(a.table) for seq, a in self.seqs.items()},
                "shared": {str(seq): a.cached_tokens // self.block_size for seq, a in self.seqs.items()},
                "refs": list(self.refs), "evictable": list(self.evictable), "free": sorted(self.free)}
