"""Prometheus metrics in a per-app registry, and the ASGI middleware that times every request."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
STAGES = ("decode", "tokenize", "text_encode", "image_encode", "lookup", "head", "search_parts", "search_scan")


class Metrics:
    """Every metric the service exports (names fixed by the contract the dashboards rely on)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.request_duration = Histogram(
            "dide_request_duration_seconds",
            "Request latency by route template and status class.",
            ["endpoint", "status_class"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_duration = Histogram(
            "dide_stage_duration_seconds",
            "Latency of one pipeline stage (a batched stage is timed once per batch).",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "dide_batch_size",
            "Rows per model call: 'text' = texts encoded, 'head' = rows through the head.",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("dide_queue_depth", "Requests waiting for a micro-batch.", registry=r)
        self.image_encodes = Gauge(
            "dide_image_encodes", "Image encodes queued or running in the worker threads.", registry=r
        )
        self.cache_hits = Counter("dide_cache_hits_total", "Embedding cache hits.", ["cache"], registry=r)
        self.cache_misses = Counter("dide_cache_misses_total", "Embedding cache misses.", ["cache"], registry=r)
        self.search_rows = Counter(
            "dide_search_rows_total", "Cached images scored by collection searches.", ["task"], registry=r
        )
        self.inflight = Gauge("dide_inflight_requests", "Requests being served.", registry=r)
        self.ready = Gauge("dide_ready", "1 when every model is loaded and warm, else 0.", registry=r)
        self.build_info = Gauge(
            "dide_build_info",
            "Always 1; the labels say what is running.",
            ["version", "provider", "model_ids", "onnxruntime"],
            registry=r,
        )
        # Make the label sets visible at 0 before the first request, so dashboards and rate() start clean, and
        # keep the children: `labels()` costs more than the observation itself, several times a request.
        self.stages = {stage: self.stage_duration.labels(stage=stage) for stage in STAGES}
        self.batch_sizes = {model: self.batch_size.labels(model=model) for model in ("text", "head")}
        for task in ("vqa", "entailment", "reasoning"):
            self.search_rows.labels(task=task)
        self.hits = {cache: self.cache_hits.labels(cache=cache) for cache in ("image", "text")}
        self.misses = {cache: self.cache_misses.labels(cache=cache) for cache in ("image", "text")}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a block as one observation of `dide_stage_duration_seconds{stage=name}`."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name].observe(time.perf_counter() - start)

    def hit(self, cache: str, n: int = 1) -> None:
        if n:
            self.hits[cache].inc(n)

    def miss(self, cache: str, n: int = 1) -> None:
        if n:
            self.misses[cache].inc(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Records latency per route template (unknown paths -> "other") and the in-flight gauge."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Sequence[BaseRoute] = ()) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    def _endpoint(self, scope: Scope) -> str:
        """The matched route's template; for requests refused before routing (413), match it here."""
        route = scope.get("route")
        if route is None:
            route = next((r for r in self.routes if r.matches(scope)[0] != Match.NONE), None)
        return getattr(route, "path", None) or "other"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client sees if the app raises before it answers
        start = time.perf_counter()

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.inflight.inc()
        try:
            await self.app(scope, receive, send_with_status)
        finally:
            self.metrics.inflight.dec()
            self.metrics.request_duration.labels(
                endpoint=self._endpoint(scope), status_class=f"{status // 100}xx"
            ).observe(time.perf_counter() - start)
