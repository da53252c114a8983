"""Prometheus metrics, named like vLLM's set under a `lamina:` prefix.

One `Metrics` object per server, on its own `CollectorRegistry` (no process-wide singleton), so two servers
or tests in one process never share counters. The engine side sets the running/waiting gauges and counts
iteration tokens; the API side records each request.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
_ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self, model_name: str) -> None:
        disable_created_metrics()  # the *_created series only double the page (vLLM turns them off too)
        self.model_name = model_name
        self.registry = CollectorRegistry()
        r, labels = self.registry, ["model_name"]
        self.num_requests_running = Gauge("lamina:num_requests_running", "Requests being decoded.", labels, registry=r)
        self.num_requests_waiting = Gauge("lamina:num_requests_waiting", "Requests waiting to be scheduled.", labels, registry=r)
        self.prompt_tokens = Counter("lamina:prompt_tokens", "Prompt tokens processed.", labels, registry=r)
        self.generation_tokens = Counter("lamina:generation_tokens", "Tokens generated.", labels, registry=r)
        self.prefix_cache_hits = Counter("lamina:prefix_cache_hits", "Prompt tokens reused from the KV cache.", labels, registry=r)
        self.prefix_cache_queries = Counter("lamina:prefix_cache_queries", "Prompt tokens looked up in the KV cache.", labels, registry=r)
        self.kv_cache_usage = Gauge("lamina:kv_cache_usage_perc", "Share of the KV-cache budget allocated (0-1).", labels, registry=r)
        self.request_success = Counter(
            "lamina:request_success", "Finished requests by finish reason.", [*labels, "finished_reason"], registry=r
        )
        self.request_prompt_tokens = Histogram(
            "lamina:request_prompt_tokens", "Prompt tokens per request.", labels, buckets=_TOKEN_BUCKETS, registry=r
        )
        self.request_generation_tokens = Histogram(
            "lamina:request_generation_tokens", "Generated tokens per request.", labels, buckets=_TOKEN_BUCKETS, registry=r
        )
        self.time_to_first_token = Histogram(
            "lamina:time_to_first_token_seconds", "Time to the first token.", labels, buckets=_LATENCY_BUCKETS, registry=r
        )
        self.inter_token_latency = Histogram(
            "lamina:inter_token_latency_seconds", "Time between tokens of a request.", labels, buckets=_ITL_BUCKETS, registry=r
        )
        self.e2e_request_latency = Histogram(
            "lamina:e2e_request_latency_seconds", "Request latency, start to last token.", labels, buckets=_LATENCY_BUCKETS, registry=r
        )
        self.iteration_tokens = Histogram(
            "lamina:iteration_tokens_total", "Tokens produced per engine step.", labels, buckets=_TOKEN_BUCKETS, registry=r
        )
        self.http_requests = Counter(
            "lamina:http_requests", "HTTP requests by route, method and status.", ["handler", "method", "status"], registry=r
        )
        self.http_request_duration = Histogram(
            "lamina:http_request_duration_seconds", "HTTP request duration.", ["handler", "method"], buckets=_LATENCY_BUCKETS, registry=r
        )

    def engine_step(self, running: int, waiting: int, tokens: int, kv_usage: float = 0.0,
                    prefix_queries: int = 0, prefix_hits: int = 0) -> None:
        """After an engine step; the prefix counts are the engine's running totals (turned into increments)."""
        name = self.model_name
        self.num_requests_running.labels(name).set(running)
        self.num_requests_waiting.labels(name).set(waiting)
        self.kv_cache_usage.labels(name).set(kv_usage)
        if tokens:
            self.iteration_tokens.labels(name).observe(tokens)
        seen_queries, seen_hits = getattr(self, "_prefix_seen", (0, 0))
        if prefix_queries > seen_queries:
            self.prefix_cache_queries.labels(name).inc(prefix_queries - seen_queries)
        if prefix_hits > seen_hits:
            self.prefix_cache_hits.labels(name).inc(prefix_hits - seen_hits)
        self._prefix_seen = (prefix_queries, prefix_hits)

    def render(self) -> bytes:
        return generate_latest(self.registry)
