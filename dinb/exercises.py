"""The tutorials' exercises and their checks: each check says right or wrong, and why.

Every notebook from 01 to 08 ends with exercises. A check works the answer out again with dinb's own
functions (the strategy, the compiled program, the checkpoint's read plan, the pipeline schedule)
and compares; its :class:`Verdict` explains the split behind the right answer, so a wrong answer
teaches as much as a right one::

    >>> from dinb import exercises
    >>> exercises.smallest_micro_batches(8)
    Not yet: with 4 stages and M = 8 the bubble is (S-1)/(M+S-1) = 3/11 = 27%, not under 20%.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dinb.errors import DinbError


@dataclass(frozen=True)
class Verdict:
    """An exercise's outcome: ``right``, and ``why`` in words."""

    right: bool
    why: str

    def __bool__(self) -> bool:
        return self.right

    def __str__(self) -> str:
        return f"{'Right' if self.right else 'Not yet'}: {self.why}"

    __repr__ = __str__

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(str(self))


def _unanswered(answer: Any, what: str) -> Verdict | None:
    if answer is None or answer is Ellipsis:
        return Verdict(False, f"no answer yet; set {what} in the cell above and run this check again.")
    return None


# ---- 01 · MindSpore's MatMul example ------------------------------------------------------------------
def no_allreduce_shard(shard: Any, ranks: int = 4) -> Verdict:
    """01: a ``((a, b), (b, c))`` shard of MindSpore's MatMul example on ``ranks`` ranks whose compiled
    program holds no all-reduce (checked in XLA's program for that many simulated devices)."""
    from dinb.explore.plan_source import PlanSource
    from dinb.models import MatMulNeg
    from dinb.sharding.strategy import infer_predict_layout

    if (missing := _unanswered(shard, "shard = ((a, b), (b, c))")) is not None:
        return missing
    try:
        (a, b), (b2, c) = shard
        net = MatMulNeg(shard=((int(a), int(b)), (int(b2), int(c))))
        strategy = infer_predict_layout(net, np.ones((128, 96), np.float32), device_num=ranks)
    except (DinbError, TypeError, ValueError) as e:
        return Verdict(False, f"{shard!r} is not a shard of x (128, 96) and W (96, 16) on {ranks} ranks: {e}")
    view = PlanSource.from_model(net).compile(strategy)
    kinds = [col.kind for col in view.collectives]
    if "all-reduce" in kinds:
        return Verdict(False, f"b = {b} cuts the contraction dimension k = 96 into {b} parts, so each rank "
                              "computes a partial sum of the whole y and XLA adds them with an all-reduce. "
                              "Keep k whole (b = 1) and split m (a) or n (c) instead.")
    used = a * b * c
    copies = f"; {ranks // used} ranks hold each block (a repeat dimension)" if used < ranks else ""
    found = ", ".join(sorted(set(kinds))) or "no collective at all"
    return Verdict(True, f"k stays whole (b = 1), so every rank computes finished elements of y "
                         f"(a = {a} splits its rows, c = {c} its columns{copies}). XLA's program holds "
                         f"{found}: the output is gathered, never summed.")


def w_replica_groups(groups: Any, shard: tuple[tuple[int, int], tuple[int, int]] = ((2, 1), (1, 2)),
                     ranks: int = 4) -> Verdict:
    """01: the groups of ranks holding the same slice of ``W`` under ``shard`` (from ``Layout``)."""
    from dinb.models.matmul import matmul_layouts

    if (missing := _unanswered(groups, "groups = [[...], [...]]")) is not None:
        return missing
    _, w_layout, _ = matmul_layouts(shard, ranks)
    expected = sorted(sorted(g) for g in w_layout.replica_groups())
    try:
        given = sorted(sorted(int(r) for r in g) for g in groups)
    except (TypeError, ValueError):
        return Verdict(False, f"give a list of rank lists, such as [[0, 1], [2, 3]]; got {groups!r}")
    explain = (f"dev_matrix {list(w_layout.dev_matrix)} numbers its dimensions from the right (d0 = c, "
               f"d1 = b, d2 = a); W's tensor_map {list(w_layout.tensor_map)} splits its columns over "
               f"d0 only, so ranks that differ only in d2 (a = {shard[0][0]}) hold the same columns: "
               f"{expected}.")
    return Verdict(given == expected, explain)


# ---- 02 · notebook ranks -----------------------------------------------------------------------
def bytes_held(held: Any, model_dir: str | Path) -> Verdict:
    """02: the bytes of parameter slices each rank of the export in ``model_dir`` holds."""
    from dinb.export.slicefile import read_slice_file

    if (missing := _unanswered(held, "held = {rank: bytes}")) is not None:
        return missing
    files = [read_slice_file(path) for path in sorted(Path(model_dir).glob("*.dinb"))]
    expected = {sf.rank: sum(a.nbytes for a in sf.params.values()) for sf in files}
    whole = sum(math.prod(m["shape"]) * np.dtype(m["dtype"]).itemsize
                for m in files[0].meta["params"].values())
    try:
        given = {int(r): int(b) for r, b in dict(held).items()}
    except (TypeError, ValueError):
        return Verdict(False, f"give a dict {{rank: bytes}}; got {held!r}")
    total = sum(expected.values())
    explain = (f"the ranks hold {_per_rank(expected)} bytes: together {total} bytes for "
               f"parameters of {whole} bytes, so " + ("no byte is held twice." if total == whole else
                                                     f"{total - whole} bytes are copies."))
    if given != expected:
        return Verdict(False, f"you have {_per_rank(given)}; ask every rank for its model's "
                              "param_bytes(). " + explain)
    return Verdict(True, explain)


def _per_rank(values: dict[int, int]) -> str:
    return ", ".join(f"rank {r}: {b}" for r, b in sorted(values.items()))


# ---- 04 · checkpoint resharding ----------------------------------------------------------------
def most_source_files(rank: Any) -> Verdict:
    """04: an MLP (d=48, ff=192) saved by 8 ranks and loaded by 3 under the Megatron split: which
    target rank reads from the most source files (worked out with ``read_plan``)."""
    from dinb.checkpoint import DistributedCheckpoint, save_distributed_checkpoint
    from dinb.models import MegatronMLP
    from dinb.sharding.strategy import infer_predict_layout

    if (missing := _unanswered(rank, "rank = ...")) is not None:
        return missing
    net = MegatronMLP(d_model=48, d_ff=192, batch=6)
    x = net.example_inputs()[0]
    with tempfile.TemporaryDirectory(prefix="dinb-exercise-") as work:
        save_distributed_checkpoint(net.init_params(0), infer_predict_layout(net, x, device_num=8), work)
        ckpt = DistributedCheckpoint(work)
        target = infer_predict_layout(net, x, device_num=3)
        sources = {r: sorted({row["source_rank"] for row in ckpt.read_plan(target, r)
                              if row["param"] == "w1"}) for r in range(3)}
    most = max(sources, key=lambda r: len(sources[r]))
    explain = (f"w1's 192 columns were saved as 8 slices of 24; each of 3 target ranks needs 64. Their "
               "borders fall inside source slices (64 = 2 x 24 + 16), so the target ranks read w1 "
               f"from source ranks {sources}: target rank {most} straddles {len(sources[most])} files.")
    return Verdict(rank == most, explain)


# ---- 03 · the strategy explorer ----------------------------------------------------------------
def mlp_without_allreduce(plan: Any, at_most: float = 0.6) -> Verdict:
    """03: a plan of the Megatron MLP in which every rank holds at most ``at_most`` of the
    parameters and XLA inserts no all-reduce."""
    from dinb.explore.plan import StrategyPlan

    if (missing := _unanswered(plan, "plan = StrategyPlan.create(...)...")) is not None:
        return missing
    if not isinstance(plan, StrategyPlan):
        return Verdict(False, "give a StrategyPlan (StrategyPlan.create(MegatronMLP(), 2, ...)); "
                              f"got {plan!r}")
    whole = sum(t.nbytes for t in plan.tensors if t.role == "parameter")
    view = plan.compile()
    held = max(row.parameters for row in plan.bytes_per_rank(view))
    kinds = sorted({c.kind for c in view.collectives})
    sent = sum(c.bytes_sent_per_rank for c in view.collectives)
    share = held / whole
    if "all-reduce" in kinds:
        return Verdict(False, "XLA inserted an all-reduce: some rank computes partial sums. That happens "
                              "when the contraction axis of a matmul is split in both operands (w2's rows "
                              "under Megatron's split). Split w2 another way.")
    if share > at_most:
        return Verdict(False, f"no all-reduce, but a rank holds {share:.0%} of the parameters (more than "
                              f"{at_most:.0%}): splitting only the batch copies every weight to every rank.")
    megatron = plan.with_preset("megatron").compile()
    theirs = sum(c.bytes_sent_per_rank for c in megatron.collectives)
    return Verdict(True, f"each rank holds {share:.0%} of the parameters and XLA inserted "
                         f"{', '.join(kinds)}: no rank sums partial products; it gathers whole activations "
                         f"instead. Each rank sends {sent / 2**10:.0f} KiB, against {theirs / 2**10:.0f} KiB "
                         "for Megatron's all-reduce: gathering the hidden layer costs more than summing "
                         "the output, which is why Megatron splits w2 by rows.")


# ---- 05 · MiniLM ----------------------------------------------------------------------------------
def minilm_tp_sizes(sizes: Any, up_to: int = 12) -> Verdict:
    """05: the tensor-parallel sizes from 1 to ``up_to`` that MiniLM's Megatron split accepts."""
    from dinb.models import BertEncoder

    if (missing := _unanswered(sizes, "sizes = [...]")) is not None:
        return missing
    encoder = BertEncoder(batch=8, seq=16)
    inputs = [tuple(spec.shape) for spec in encoder.input_specs()]
    accepted, reasons = [], {}
    for tp in range(1, up_to + 1):
        try:
            encoder.strategy(tp, "megatron").validate(encoder.param_shapes(), inputs)
            accepted.append(tp)
        except DinbError as e:
            reasons[tp] = str(e).split(";")[0]
    given = sorted({int(s) for s in _as_list(sizes)})
    explain = (f"the split gives each rank whole heads, so tp must divide the {encoder.heads} heads "
               f"(and the FFN's 1536 columns): {accepted}.")
    wrong = [s for s in given if s not in accepted]
    if wrong:
        why = reasons.get(wrong[0], "out of range")
        return Verdict(False, f"tp={wrong[0]} is refused ({why}); " + explain)
    return Verdict(given == accepted, explain if given == accepted
                   else f"you missed {[s for s in accepted if s not in given]}; " + explain)


def _as_list(values: Any) -> list[Any]:
    return list(values) if isinstance(values, Iterable) else [values]


# ---- 08 · serving -----------------------------------------------------------------------------------
def batch_bucket(buckets: Any, runs_at: Any, model_dir: str | Path, rows: int = 3) -> Verdict:
    """08: the batch buckets of the export in ``model_dir``, and the bucket a lone request of
    ``rows`` rows runs at."""
    from dinb.export.slicefile import read_meta
    from dinb.sharding import batch_buckets

    if (missing := _unanswered(buckets, "buckets = [...]")) is not None:
        return missing
    meta = read_meta(next(iter(sorted(Path(model_dir).glob("*.dinb")))))
    held = [int(b) for b in meta.get("batch_buckets") or [meta["inputs"][0]["shape"][0]]]
    at = batch_buckets.smallest(held, rows)
    explain = (f"the export holds one program per bucket, {held}; the batcher pads a request of {rows} "
               f"rows to the smallest bucket that holds it, {at} ({at - rows} padded row(s), against "
               f"{held[-1] - rows} without buckets).")
    right = sorted(int(b) for b in _as_list(buckets)) == held and runs_at == at
    return Verdict(right, explain)


# ---- 06 · pipeline stages ---------------------------------------------------------------------------
def smallest_micro_batches(micro_batches: Any, stages: int = 4, batch: int = 32,
                           bubble_below: float = 0.2) -> Verdict:
    """06: the smallest micro-batch count that divides ``batch`` and brings GPipe's bubble
    ``(S-1)/(M+S-1)`` under ``bubble_below`` with ``stages`` stages."""
    from dinb.sharding.pipeline import bubble_fraction

    if (missing := _unanswered(micro_batches, "micro_batches = ...")) is not None:
        return missing
    best = next(m for m in range(1, batch + 1)
                if batch % m == 0 and bubble_fraction(stages, m) < bubble_below)
    m = int(micro_batches)
    bubble = f"{stages - 1}/{m + stages - 1} = {bubble_fraction(stages, m):.0%}"
    if batch % m:
        return Verdict(False, f"M = {m} does not divide the batch of {batch} rows into equal micro-batches.")
    if bubble_fraction(stages, m) >= bubble_below:
        return Verdict(False, f"with {stages} stages and M = {m} the bubble is (S-1)/(M+S-1) = {bubble}, "
                              f"not under {bubble_below:.0%}.")
    if m != best:
        return Verdict(False, f"M = {m} works (bubble {bubble}), but a smaller one does too.")
    return Verdict(True, f"the bubble is (S-1)/(M+S-1) = {bubble}; it needs M > {stages - 1}/"
                         f"{bubble_below:g} - {stages - 1} = {(stages - 1) / bubble_below - (stages - 1):g}, "
                         f"and {best} is the first count above that which divides {batch}.")


# ---- 07 · generation ---------------------------------------------------------------------------------
def decode_windows(windows: Any, prompt_len: int = 120, new_tokens: int = 24,
                   export_windows: tuple[int, ...] = (128, 512, 2048),
                   decode_steps: tuple[int, ...] = (1, 2, 4, 8)) -> Verdict:
    """07: the attention window of each decode call that generates ``new_tokens`` after a prompt
    of ``prompt_len`` tokens, in order, for an export with ``export_windows`` and ``decode_steps``."""
    from dinb.models.decode_loop import call_plan

    if (missing := _unanswered(windows, "windows = [...]")) is not None:
        return missing
    plan = call_plan(prompt_len, new_tokens, export_windows, decode_steps)
    want = [w for _, w in plan]
    reach = [int(r) for r in np.cumsum([k for k, _ in plan]) + prompt_len]  # positions after each call
    calls = ", ".join(f"{k} step{'s' * (k > 1)} to position {r - 1} -> {w}" for (k, w), r in zip(plan, reach))
    got = [int(w) for w in _as_list(windows)]
    if len(got) != len(want):
        return Verdict(False, f"the prefill picks token 1 and {len(want)} decode calls pick the other "
                              f"{new_tokens - 1} (each the most steps a call has that the tokens left "
                              f"fill), not {len(got)} calls.")
    if got != want:
        wrong = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
        return Verdict(False, f"call {wrong + 1} writes up to position {reach[wrong] - 1}, so it needs "
                              f"the smallest window holding {reach[wrong]} positions: {want[wrong]}, "
                              f"not {got[wrong]}.")
    return Verdict(True, f"{calls}. A call attends over the smallest window that holds the last position "
                         "it writes, so a short context reads a short cache.")


__all__ = ["Verdict", "batch_bucket", "bytes_held", "decode_windows", "minilm_tp_sizes",
           "mlp_without_allreduce", "most_source_files", "no_allreduce_shard", "smallest_micro_batches",
           "w_replica_groups"]

