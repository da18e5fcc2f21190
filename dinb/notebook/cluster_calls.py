"""The calls a notebook makes on its ranks once they run: load an export, predict (over the
ranks' own sockets), generate, the per-rank outputs, status, serving, a cell on every rank.

:class:`ModelCalls` holds what the ranks have loaded (the export, its stages, the last predict)
and makes every call through the cluster's :class:`~dinb.notebook.dispatch.RankCalls` (every
rank, watched with a timeout); :class:`~dinb.notebook.cluster.RankCluster` offers them as its
own methods.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dinb.errors import ClusterError, RankFailedError
from dinb.job import remote_predict
from dinb.notebook import engine
from dinb.notebook.dispatch import RankCalls


@dataclass
class PredictResult:
    """The outputs of one predict: one copy (all ranks agree) plus each rank's own view."""

    outputs: list[np.ndarray]
    per_rank: dict[int, list[np.ndarray]]
    agree: bool
    seconds: float


def _run_cell(code: str) -> str:
    """Executed in an engine: run ``code`` in the engine's namespace, capture what it prints."""
    import contextlib
    import io

    import __main__

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(code, "<dinfer cell>", "exec"), __main__.__dict__)
    return buf.getvalue()


class ModelCalls:
    """What the ranks of ``n`` have loaded, and the calls that use it."""

    def __init__(self, n: int):
        self.n = n
        self.model_dir: str | None = None
        self.pipeline: dict[str, Any] | None = None  # the loaded export's stages (None: one stage)
        self.roles = remote_predict.Roles(n, n)  # who takes inputs and who gives outputs
        self.last: PredictResult | None = None
        self.last_generation: dict[str, Any] | None = None  # rank 0's tokens and timings

    # ---- the Lite-shaped steps ---------------------------------------------------------------
    def context(self, calls: RankCalls, target: str = "cpu", provider: str = "xla") -> list[str]:
        """Build every rank's ``Context`` (target, provider)."""
        return calls.call(engine.set_context, (target, provider), what="building the context")

    def load(self, calls: RankCalls, model_dir: str | Path, show_progress: bool = True) -> dict[str, Any]:
        """Each rank loads its own slice file from ``model_dir`` and compiles the program.

        Two bars count the ranks that have read their slices and those that have compiled.
        """
        model_dir = str(Path(model_dir).resolve())
        from tqdm.auto import tqdm

        bars = {phase: tqdm(total=self.n, desc=desc, leave=False, disable=not show_progress)
                for phase, desc in (("read", "slices read"), ("compiled", "ranks compiled"))}

        def count(ars: list[Any]) -> None:
            for phase, bar in bars.items():
                done = sum(ar.ready() or (ar.data or {}).get(phase) is not None for ar in ars)
                bar.update(done - bar.n)

        try:
            infos = calls.call(engine.load, (model_dir,), what=f"loading {model_dir}", on_poll=count)
        finally:
            for bar in bars.values():
                bar.close()
        self.model_dir, self.last = model_dir, None
        self.pipeline = infos[0].get("pipeline")
        self.roles = remote_predict.Roles.of(self.n, self.pipeline)
        return infos[0]

    def predict(self, calls: RankCalls, *inputs: Any, timeout_s: float | None = None, fast: bool = True,
                micro_batches: int | None = None) -> PredictResult:
        """Send the same inputs to the first stage's ranks (every rank without pipeline stages,
        as in MindSpore Lite's example), run the program, gather.

        The fast path sends the inputs over each rank's own socket and gets back the outputs of
        the first rank of the last stage plus every other last-stage rank's output checksum (so
        agreement is checked without moving the data); :meth:`outputs` fetches each rank's own
        copy when asked. ``fast=False`` goes through ipyparallel (``apply`` on every engine) and
        returns every rank's outputs. ``micro_batches`` cuts a pipelined predict into that many
        micro-batches (see :meth:`dinb.Model.predict`).
        """
        arrays = [np.ascontiguousarray(x) for x in inputs]
        t0 = time.perf_counter()
        roles = self.roles
        if fast:
            wait = calls.timeout_s if timeout_s is None else timeout_s
            first, agree = calls.fast_predict(arrays, roles, wait, micro_batches=micro_batches)
            per_rank: dict[int, list[np.ndarray]] = {roles.data_rank: first}
        else:
            outs = calls.call(engine.predict, (arrays, micro_batches), timeout_s=timeout_s, what="predict")
            per_rank = dict(enumerate(outs))
            first = outs[roles.data_rank]
            agree = all(len(outs[r]) == len(first)
                        and all(np.array_equal(a, b) for a, b in zip(outs[r], first))
                        for r in roles.output_ranks)
        self.last = PredictResult(list(first), per_rank, agree, time.perf_counter() - t0)
        return self.last

    def generate(self, calls: RankCalls, prompt_ids: Any, max_new_tokens: int = 32, *,
                 timeout_s: float | None = None, on_token: Callable[[int, int], None] | None = None,
                 **sampling: Any) -> list[int] | list[list[int]]:
        """Every rank runs :meth:`dinb.Model.generate` with the same prompts (token ids) and
        options and the tokens come back as ``Model.generate`` gives them; ``on_token(row,
        token)`` sees rank 0's tokens while the ranks still work (they publish them as they come).
        Ranks that picked other tokens than rank 0 are an error naming them; rank 0's timings are
        in :attr:`last_generation`."""
        shown: list[int] = []
        single = len(prompt_ids) > 0 and np.ndim(prompt_ids[0]) == 0

        def stream(rows: list[list[int]]) -> None:
            for row, toks in enumerate(rows):
                while len(shown) <= row:
                    shown.append(0)
                for token in toks[shown[row]:]:
                    if on_token is not None:
                        on_token(row, int(token))
                shown[row] = len(toks)

        outs = calls.call(engine.generate, (prompt_ids, max_new_tokens, sampling), timeout_s=timeout_s,
                          what="generate",
                          on_poll=lambda ars: stream((ars[0].data or {}).get("tokens") or []))
        tokens = outs[0]["tokens"]
        stream([tokens] if single else tokens)
        odd = [r for r, o in enumerate(outs) if o["tokens"] != tokens]
        if odd:
            raise RankFailedError(f"rank(s) {odd} picked other tokens than rank 0; every rank must run the "
                                  "same generation (same prompts, options and export)", ranks=tuple(odd))
        self.last_generation = {"tokens": tokens, "timings": outs[0]["timings"]}
        return tokens

    def outputs(self, calls: RankCalls) -> PredictResult:
        """The last predict's result, with every rank's own outputs."""
        if self.last is None:
            raise ClusterError("no predict has run yet; run `%dinfer predict EXPR` first")
        if len(self.last.per_rank) < self.n:
            outs = calls.call(engine.outputs, timeout_s=30, what="gathering outputs")
            self.last.per_rank = dict(enumerate(outs))
        return self.last

    def ping(self, calls: RankCalls, timeout_s: float = 10) -> float:
        """Round trip of an empty message to every rank over the fast path, in seconds."""
        t0 = time.perf_counter()
        calls.fast_predict([], self.roles, timeout_s, noop=True)
        return time.perf_counter() - t0

    def timeline(self, calls: RankCalls) -> list[Any]:
        """When each rank computed each micro-batch in the last pipelined predict (see
        :meth:`dinb.Model.timeline`); empty without pipeline stages."""
        from dinb.sharding.pipeline import StageEvent

        rows = calls.call(engine.timeline, timeout_s=30, what="gathering the timeline")
        return sorted((StageEvent(*e) for per_rank in rows for e in per_rank), key=lambda e: e.start)

    def strategy(self) -> Any:
        """The loaded model's strategy (from the export's ``strategy.json``)."""
        from dinb.sharding.strategy import Strategy

        if self.model_dir is None:
            raise ClusterError("no model is loaded; run `%dinfer load DIR` first")
        path = Path(self.model_dir)
        return Strategy.load(path / "strategy.json" if path.is_dir() else path.parent / "strategy.json")

    def status(self, calls: RankCalls, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``rows`` (one per rank: rank, pid, alive, host, ...) with, when every rank is alive, what
        each holds: device memory, resident memory, provider, collectives, what is loaded."""
        if rows and all(row["alive"] for row in rows):
            for row, st in zip(rows, calls.call(engine.status, timeout_s=10, what="status")):
                row.update(kind=st["kind"], device_mem=st["device_mem"], rss_mib=st["rss_mib"],
                           provider=st["provider"], collectives=st["collectives"], loaded=st["loaded"])
        return rows

    def serve(self, calls: RankCalls, distributed_address: str, worker_timeout_s: float = 300.0) -> str:
        """Make every rank an Agent of the servable whose Distributed Worker listens at
        ``distributed_address`` (:func:`dinb.serving.distributed.start_servable`, in this kernel or
        elsewhere); the ranks serve from a thread until :meth:`stop_serving`. Returns the job id."""
        if self.model_dir is None:
            raise ClusterError("no model is loaded; run `%dinfer load DIR` first, then serve it")
        job = f"notebook-{calls.engine_of[0]}-{calls.pids[0]}"
        calls.call(engine.serve_agent, (distributed_address, job, worker_timeout_s),
                  what="starting the agents")
        return job

    def stop_serving(self, calls: RankCalls) -> None:
        """The ranks stop serving (the worker sees them go)."""
        calls.call(engine.stop_agent, what="stopping the agents")

    def execute(self, calls: RankCalls, code: str, timeout_s: float | None = None) -> dict[int, str]:
        """Run a cell on every rank; returns each rank's printed output."""
        return dict(enumerate(calls.call(_run_cell, (code,), timeout_s=timeout_s, what="the cell")))
