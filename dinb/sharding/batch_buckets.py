"""Batch buckets: one program per batch size, so a small batch does not pay for a large one.

An export's program has fixed shapes (the export's batch ``B`` on every input's first axis). A
server merging requests would pad a lone request to ``B`` rows and run all of them. With
buckets, the export also holds ``program/batch_<b>`` for each bucket ``b < B`` (the same model
traced at batch ``b``: same parameters and layouts, so every rank's slices serve every bucket),
and a batch of ``n`` rows runs the smallest bucket ``b >= n``, padded with ``b - n`` zero rows::

    buckets 1, 2, 4, 8, 16, 32:   n = 1 -> b = 1,  n = 3 -> b = 4,  n = 20 -> b = 32

A layout that splits the batch axis over ``p`` ranks needs ``b % p == 0``; :func:`choices`
gives the powers of two up to ``B`` that every input's layout divides (and ``B`` itself).
Every input and output carries the batch on axis 0 (checked at export).
"""

from __future__ import annotations

from collections.abc import Sequence

from dinb.errors import DinbError, StrategyError
from dinb.sharding.layout import Layout

PREFIX = "batch_"


def program_name(batch: int) -> str:
    """The slice file's extra program for ``batch`` rows: ``program/batch_<b>``."""
    return f"{PREFIX}{batch}"


def at_batch(shape: Sequence[int], batch: int | None) -> tuple[int, ...]:
    """``shape`` with its first (batch) axis set to ``batch`` (None: ``shape`` as it is)."""
    return tuple(shape) if batch is None else (batch, *tuple(shape)[1:])


def divides(layouts: Sequence[Layout], shapes: Sequence[Sequence[int]], batch: int) -> bool:
    """Whether every layout splits its tensor evenly at ``batch`` rows."""
    try:
        for lay, shape in zip(layouts, shapes):
            lay.check_shape(at_batch(shape, batch))
    except DinbError:
        return False
    return True


def choices(layouts: Sequence[Layout], shapes: Sequence[Sequence[int]]) -> list[int]:
    """The default buckets: 1, 2, 4, ... up to the export's batch (included), those the layouts divide."""
    top = int(shapes[0][0])
    powers = [1 << k for k in range(top.bit_length()) if (1 << k) < top]
    return [b for b in powers if divides(layouts, shapes, b)] + [top]


def check(buckets: Sequence[int], layouts: Sequence[Layout], shapes: Sequence[Sequence[int]],
          names: Sequence[str]) -> list[int]:
    """The buckets sorted, with the export's batch among them; errors name what to change."""
    if not shapes:
        raise StrategyError("batch buckets need a model with inputs")
    top = int(shapes[0][0]) if len(shapes[0]) else 0
    flat = [n for n, s in zip(names, shapes) if not len(s) or int(s[0]) != top]
    if flat or top < 1:
        raise StrategyError(
            f"batch buckets need every input's first axis to be the batch ({top} rows here); "
            f"input(s) {flat} have another first axis. Export without batch buckets"
        )
    wanted = sorted({int(b) for b in buckets} | {top})
    wrong = [b for b in wanted if b < 1 or b > top]
    if wrong:
        raise StrategyError(f"batch buckets {wrong} are outside 1..{top} (the export's batch is the "
                            "largest bucket; export with a larger batch for larger buckets)")
    odd = [b for b in wanted if not divides(layouts, shapes, b)]
    if odd:
        raise StrategyError(
            f"batch buckets {odd}: the inputs' layouts do not split that many rows evenly; buckets "
            f"that would do: {choices(layouts, shapes)}"
        )
    return wanted


def smallest(buckets: Sequence[int], rows: int) -> int:
    """The smallest bucket that holds ``rows`` rows (``buckets`` sorted, ``rows`` <= the largest)."""
    for b in buckets:
        if b >= rows:
            return b
    raise DinbError(f"{rows} rows do not fit the largest batch bucket {buckets[-1]}")
