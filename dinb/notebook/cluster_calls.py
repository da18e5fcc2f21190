"""The calls a notebook makes on its ranks once they run: load an export, predict (over the
ranks' own sockets), generate, the per-rank outputs, status, serving, a cell on every rank.

:class:`dinb.notebook.cluster.RankCluster` takes them from :class:`ModelCalls`; they go through
its ``_all`` (every rank, watched with a timeout).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dinb.errors import ClusterError, RankFailedError
from dinb.job import remote_predict, wire
from dinb.notebook import engine


@dataclass
class PredictResult:
    """The outputs of one predict: one copy (all ranks agree) plus each rank's own view."""

    outputs: list[np.ndarray]
    per_rank: dict[int, list[np.ndarray]]
    agree: bool
    seconds: float


class _Published:
    """The final tokens in the shape of a running call's published data (see ``generate``)."""

    def __init__(self, tokens: Any, prompts: Any):
        single = len(prompts) > 0 and np.ndim(prompts[0]) == 0
        self.data = {"tokens": [tokens] if single else tokens}


def _run_cell(code: str) -> str:
    """Executed in an engine: run ``code`` in the engine's namespace, capture what it prints."""
    import contextlib
    import io

    import __main__

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(code, "<dinfer cell>", "exec"), __main__.__dict__)
    return buf.getvalue()


def _remote_message(e: Exception) -> str:
    ename, evalue = getattr(e, "ename", type(e).__name__), getattr(e, "evalue", str(e))
    return f"{ename}: {evalue}"


class ModelCalls:
    """What runs on the ranks of a started cluster (a part of :class:`RankCluster`)."""

    # ---- the Lite-shaped steps ---------------------------------------------------------------
    def context(self, target: str = "cpu", provider: str = "xla") -> list[str]:
        """Build every rank's ``Context`` (target, provider)."""
        return self._all(engine.set_context, (target, provider), what="building the context")

    def load(self, model_dir: str | Path, show_progress: bool = True) -> dict[str, Any]:
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
            infos = self._all(engine.load, (model_dir,), what=f"loading {model_dir}", on_poll=count)
        finally:
            for bar in bars.values():
                bar.close()
        self.model_dir, self.last = model_dir, None
        self.pipeline = infos[0].get("pipeline")
        self.roles = remote_predict.Roles.of(self.n, self.pipeline)
        return infos[0]

    def predict(self, *inputs: Any, timeout_s: float | None = None, fast: bool = True,
                micro_batches: int | None = None) -> PredictResult:
        """Send the same inputs to the first stage's ranks (every rank without pipeline stages,
        as in the seeds), run the program, gather.

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
            first, agree = self._fast_predict(arrays, self.timeout_s if timeout_s is None else timeout_s,
                                              micro_batches=micro_batches)
            per_rank: dict[int, list[np.ndarray]] = {roles.data_rank: first}
        else:
            outs = self._all(engine.predict, (arrays, micro_batches), timeout_s=timeout_s, what="predict")
            per_rank = dict(enumerate(outs))
            first = outs[roles.data_rank]
            agree = all(len(outs[r]) == len(first)
                        and all(np.array_equal(a, b) for a, b in zip(outs[r], first))
                        for r in roles.output_ranks)
        self.last = PredictResult(list(first), per_rank, agree, time.perf_counter() - t0)
        return self.last

    def generate(self, prompt_ids: Any, max_new_tokens: int = 32, *, timeout_s: float | None = None,
                 on_token: Callable[[int, int], None] | None = None, **sampling: Any) -> dict[str, Any]:
        """Every rank runs :meth:`dinb.Model.generate` with the same prompts (token ids) and
        options; ``on_token(row, token)`` sees rank 0's tokens while the ranks still work (they
        publish them as they come). Returns ``tokens`` (rank 0's, as ``Model.generate`` gives
        them), ``agree`` (every rank picked the same) and rank 0's ``timings``."""
        shown: list[int] = []

        def stream(ars: list[Any]) -> None:
            rows = (ars[0].data or {}).get("tokens") or []
            for row, toks in enumerate(rows):
                while len(shown) <= row:
                    shown.append(0)
                for token in toks[shown[row]:]:
                    if on_token is not None:
                        on_token(row, int(token))
                shown[row] = len(toks)

        outs = self._all(engine.generate, (prompt_ids, max_new_tokens, sampling), timeout_s=timeout_s,
                         what="generate", on_poll=stream)
        stream([_Published(outs[0]["tokens"], prompt_ids)])
        return {"tokens": outs[0]["tokens"], "agree": all(o["tokens"] == outs[0]["tokens"] for o in outs),
                "timings": outs[0]["timings"]}

    def outputs(self) -> PredictResult:
        """The last predict's result, with every rank's own outputs."""
        if self.last is None:
            raise ClusterError("no predict has run yet; run `%dinfer predict EXPR` first")
        if len(self.last.per_rank) < self.n:
            outs = self._all(engine.outputs, timeout_s=30, what="gathering outputs")
            self.last.per_rank = dict(enumerate(outs))
        return self.last

    def ping(self, timeout_s: float = 10) -> float:
        """Round trip of an empty message to every rank over the fast path, in seconds."""
        t0 = time.perf_counter()
        self._fast_predict([], timeout_s, noop=True)
        return time.perf_counter() - t0

    def _fast_predict(self, arrays: list[np.ndarray], timeout_s: float, noop: bool = False,
                      micro_batches: int | None = None) -> tuple[list[np.ndarray], bool]:
        import zmq

        if self._client is None:
            raise ClusterError("no cluster is running; start one with `%dinfer cluster start -n 2`")
        assert self._socks is not None  # made at start
        roles = self.roles
        extra = {"micro_batches": micro_batches} if micro_batches is not None else {}
        for r, sock in enumerate(self._socks):
            header, takes = roles.header(r, noop=noop, **extra)
            sock.send_multipart(wire.pack(header, arrays if takes else []), copy=False)
        poller = zmq.Poller()
        for sock in self._socks:
            poller.register(sock, zmq.POLLIN)
        replies: dict[int, list[Any]] = {}
        deadline = time.monotonic() + timeout_s
        while len(replies) < self.n:
            events = dict(poller.poll(5))
            for r, sock in enumerate(self._socks):
                if r not in replies and sock in events:
                    replies[r] = sock.recv_multipart(copy=False)
            if len(replies) == self.n:
                break
            self._check_alive("predict")
            if time.monotonic() > deadline:
                self._broken = True
                pending = [r for r in range(self.n) if r not in replies]
                raise RankFailedError(
                    f"rank(s) {pending} did not answer predict within {timeout_s:g} s; "
                    "run `%dinfer cluster restart` (RankCluster.restart()).", ranks=tuple(pending))
        heads, data, errors = remote_predict.read_replies(replies)
        if errors:
            detail = "; ".join(f"rank {r}: {m}" for r, m in sorted(errors.items()))
            raise RankFailedError(f"predict failed on rank(s) {sorted(errors)}: {detail}",
                                  ranks=tuple(sorted(errors)))
        return data[roles.data_rank], remote_predict.agreement(heads, roles.output_ranks)

    def timeline(self) -> list[Any]:
        """When each rank computed each micro-batch in the last pipelined predict (see
        :meth:`dinb.Model.timeline`); empty without pipeline stages."""
        from dinb.sharding.pipeline import StageEvent

        rows = self._all(engine.timeline, timeout_s=30, what="gathering the timeline")
        return sorted((StageEvent(*e) for per_rank in rows for e in per_rank), key=lambda e: e.start)

    def strategy(self) -> Any:
        """The loaded model's strategy (from the export's ``strategy.json``)."""
        from dinb.sharding.strategy import Strategy

        if self.model_dir is None:
            raise ClusterError("no model is loaded; run `%dinfer load DIR` first")
        path = Path(self.model_dir)
        return Strategy.load(path / "strategy.json" if path.is_dir() else path.parent / "strategy.json")

    def status(self) -> list[dict[str, Any]]:
        """One row per rank: rank, pid, device, resident memory, what is loaded (alive or not)."""
        rows = []
        for r, pid in enumerate(self.pids):
            rows.append({"rank": r, "pid": pid, "alive": self._rank_alive(r), "host": self.hostnames[r],
                         "address": self.rank_addresses[r],
                         "device": self.device_names[r] if r < len(self.device_names) else None})
        if rows and all(row["alive"] for row in rows):
            for row, st in zip(rows, self._all(engine.status, timeout_s=10, what="status")):
                row.update(kind=st["kind"], device_mem=st["device_mem"], rss_mib=st["rss_mib"],
                           provider=st["provider"], collectives=st["collectives"], loaded=st["loaded"])
        return rows

    def serve(self, distributed_address: str, worker_timeout_s: float = 300.0) -> str:
        """Make every rank an Agent of the servable whose Distributed Worker listens at
        ``distributed_address`` (:func:`dinb.serving.distributed.start_servable`, in this kernel or
        elsewhere); the ranks serve from a thread until :meth:`stop_serving`. Returns the job id."""
        if self.model_dir is None:
            raise ClusterError("no model is loaded; run `%dinfer load DIR` first, then serve it")
        job = f"notebook-{self.engine_of[0]}-{self.pids[0]}"
        self._all(engine.serve_agent, (distributed_address, job, worker_timeout_s),
                  what="starting the agents")
        return job

    def stop_serving(self) -> None:
        """The ranks stop serving (the worker sees them go)."""
        self._all(engine.stop_agent, what="stopping the agents")

    def execute(self, code: str, timeout_s: float | None = None) -> dict[int, str]:
        """Run a cell on every rank; returns each rank's printed output."""
        return dict(enumerate(self._all(_run_cell, (code,), timeout_s=timeout_s, what="the cell")))
