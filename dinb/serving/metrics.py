"""Prometheus metrics of the serving process (``GET /metrics`` on the REST server).

``dinb_requests_total{model, protocol, status}``, ``dinb_request_seconds{model, protocol}``
(end to end inside the server), ``dinb_queue_seconds{servable}`` (enqueued to batch start),
``dinb_batch_rows{servable}`` (rows per model run: above 1 when requests were merged),
``dinb_batch_runs_total{servable, bucket}`` (model runs by the batch size they ran at: the
smallest batch bucket holding the merged rows) and
``dinb_rank_compute_seconds{servable, rank}`` (``Model.predict`` inside each agent); for a decoder
with a paged KV cache ``dinb_kv_blocks{servable, state}`` (blocks ``in_use``, ``free``, and
``cached``: free but holding a prefix that a new prompt can share),
``dinb_prefix_cache_blocks_total{servable, result}`` (prompt blocks looked up: ``hit`` or
``miss``), ``dinb_kv_preemptions_total{servable}`` (sequences preempted when the pool ran out,
resumed later by recompute) and ``dinb_kv_waiting_requests{servable}`` (requests waiting for
blocks or slots). Each
serving process has its own registry, so tests and notebooks can start several.
"""

from __future__ import annotations

from typing import Any

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "dinb_requests_total",
            "Requests by model, protocol and status",
            ["model", "protocol", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "dinb_request_seconds",
            "Time of a request inside the server",
            ["model", "protocol"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue = Histogram(
            "dinb_queue_seconds",
            "Time from enqueue to the start of its batch",
            ["servable"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.rows = Histogram(
            "dinb_batch_rows",
            "Rows per model run (merged requests)",
            ["servable"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )
        self.runs = Counter(
            "dinb_batch_runs",
            "Model runs by the batch size run (the batch bucket the rows were padded to)",
            ["servable", "bucket"],
            registry=self.registry,
        )
        self.compute = Histogram(
            "dinb_rank_compute_seconds",
            "Model.predict inside each agent",
            ["servable", "rank"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.kv_blocks = Gauge("dinb_kv_blocks", "Blocks of the paged KV cache (in_use, free, cached)",
                               ["servable", "state"], registry=self.registry)
        self.prefix = Counter("dinb_prefix_cache_blocks", "Prompt blocks looked up in the prefix cache",
                              ["servable", "result"], registry=self.registry)
        self.kv_waiting = Gauge("dinb_kv_waiting_requests", "Requests waiting for cache blocks or a slot",
                                ["servable"], registry=self.registry)
        self.preemptions = Counter("dinb_kv_preemptions", "Sequences preempted when the KV cache's pool "
                                   "ran out (resumed by recompute)", ["servable"], registry=self.registry)
        self._seen: dict[str, tuple[int, int, int]] = {}  # prefix hits, lookups, preemptions counted

        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once (``labels`` takes a lock and builds keys on
        every call: 0.02 ms a request here)."""
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def request(self, model: str, protocol: str, status: str, seconds: float) -> None:
        self._child(self.requests, model, protocol, status).inc()
        self._child(self.latency, model, protocol).observe(seconds)

    def batch(self, servable: str, queued_s: list[float], rows: int, compute_ms: dict[int, float],
              bucket: int | None = None) -> None:
        queue = self._child(self.queue, servable)
        for q in queued_s:
            queue.observe(q)
        self._child(self.rows, servable).observe(rows)
        if bucket is not None:
            self._child(self.runs, servable, str(bucket)).inc()
        for rank, ms in compute_ms.items():
            self._child(self.compute, servable, str(rank)).observe(ms / 1e3)

    def kv_cache(self, servable: str, stats: dict[str, int], waiting: int) -> None:
        """A paged cache's blocks after a generation step (``BlockPool.stats``)."""
        for state in ("in_use", "free", "cached"):
            self._child(self.kv_blocks, servable, state).set(stats[state])
        hits, queries, preempted = self._seen.get(servable, (0, 0, 0))
        self._child(self.prefix, servable, "hit").inc(stats["prefix_hits"] - hits)
        self._child(self.prefix, servable, "miss").inc(stats["prefix_queries"] - stats["prefix_hits"]
                                                        - (queries - hits))
        self._child(self.preemptions, servable).inc(stats["preemptions"] - preempted)
        self._seen[servable] = (stats["prefix_hits"], stats["prefix_queries"], stats["preemptions"])
        self._child(self.kv_waiting, servable).set(waiting)

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def status_of(error: BaseException | None) -> str:
    """The status label of a request: ok, bad_request, not_found, unavailable, error."""
    from dinb.serving.inference import NotFound, RequestError
    from dinb.serving.worker import Unavailable

    kinds: list[tuple[type, str]] = [
        (RequestError, "bad_request"),
        (NotFound, "not_found"),
        (Unavailable, "unavailable"),
    ]
    if error is None:
        return "ok"
    return next((label for cls, label in kinds if isinstance(error, cls)), "error")


__all__: list[Any] = ["Metrics", "status_of"]
