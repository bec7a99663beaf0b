"""Prometheus metrics of one api_server app, in the app's own registry (two apps never share one)."""
from __future__ import annotations

from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

# engine stats key -> (metric name, help); counters are cumulative since the engine started
ENGINE_COUNTERS = {
    "num_prompt_tokens_computed": ("lmwrap_engine_prompt_tokens_computed", "prompt positions run through the model"),
    "num_generated_tokens_computed": ("lmwrap_engine_generated_tokens_computed",
                                      "generated positions run through the model"),
    "num_prefix_hit_tokens": ("lmwrap_prefix_cache_hit_tokens", "prompt tokens served from the prefix cache"),
    "num_prefix_query_tokens": ("lmwrap_prefix_cache_query_tokens", "prompt tokens looked up in the prefix cache"),
    "num_preemptions": ("lmwrap_num_preemptions", "requests preempted (their KV recomputed later)"),
}
ENGINE_GAUGES = {
    "num_running": ("lmwrap_num_requests_running", "requests the engine is running"),
    "num_waiting": ("lmwrap_num_requests_waiting", "requests waiting to be scheduled"),
    "num_sessions": ("lmwrap_num_sessions", "sessions holding KV cache in the engine"),
    "num_blocks": ("lmwrap_kv_cache_blocks_total", "KV cache blocks in the pool"),
    "num_free_blocks": ("lmwrap_kv_cache_blocks_free", "KV cache blocks free"),
}


class _EngineCollector:
    """Reports the last engine stats snapshot (refreshed by the /metrics route before each scrape)."""

    def __init__(self):
        self.stats: dict = {}

    def collect(self):
        stats = self.stats
        for key, (name, doc) in ENGINE_COUNTERS.items():
            if key in stats:
                yield CounterMetricFamily(name, doc, value=stats[key])
        for key, (name, doc) in ENGINE_GAUGES.items():
            if key in stats:
                yield GaugeMetricFamily(name, doc, value=stats[key])
        if "num_blocks" in stats and "num_free_blocks" in stats:
            yield GaugeMetricFamily("lmwrap_kv_cache_blocks_used", "KV cache blocks in use",
                                    value=stats["num_blocks"] - stats["num_free_blocks"])
        queried = stats.get("num_prefix_query_tokens", 0)
        if "num_prefix_hit_tokens" in stats:
            rate = stats["num_prefix_hit_tokens"] / queried if queried else 0.0
            yield GaugeMetricFamily("lmwrap_prefix_cache_hit_rate",
                                    "prefix-cache hit tokens / looked-up prompt tokens", value=rate)
        replicas = stats.get("replicas") or []
        if replicas:  # data-parallel replicas (lmwrap_engine.replicas): each one's stats under its index
            per = dict(ENGINE_COUNTERS, **ENGINE_GAUGES, outstanding=("lmwrap_replica_outstanding_requests",
                                                                      "requests routed to the replica, not finished"))
            for key, (name, doc) in per.items():
                family = (CounterMetricFamily if key in ENGINE_COUNTERS else GaugeMetricFamily)(
                    f"{name}_by_replica" if key != "outstanding" else name, f"{doc}, per replica", labels=["replica"])
                for i, s in enumerate(replicas):
                    if key in s:
                        family.add_metric([str(i)], s[key])
                yield family


class ServerMetrics:
    """Request counters and latency histograms kept by the routes, plus engine stats at scrape time."""

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("lmwrap_requests", "finished requests by route and finish reason",
                                ["route", "finish_reason"], registry=self.registry)
        self.prompt_tokens = Counter("lmwrap_prompt_tokens", "prompt tokens of finished requests",
                                     registry=self.registry)
        self.generation_tokens = Counter("lmwrap_generation_tokens", "tokens generated for finished requests",
                                         registry=self.registry)
        self.responses = Counter("lmwrap_http_responses", "HTTP responses by status code", ["code"],
                                 registry=self.registry)
        self.ttft = Histogram("lmwrap_time_to_first_token_seconds", "time to the first generated token",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("lmwrap_inter_token_latency_seconds", "time between streamed deltas",
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("lmwrap_e2e_request_latency_seconds", "request latency, arrival to last token",
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self._engine = _EngineCollector()
        self.registry.register(self._engine)

    def observe_finished(self, route: str, finish_reason: Optional[str], prompt_tokens: int,
                         generated_tokens: int, e2e_s: float) -> None:
        self.requests.labels(route, finish_reason or "none").inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generated_tokens)
        self.e2e.observe(e2e_s)

    def render(self, engine_stats: dict) -> bytes:
        self._engine.stats = engine_stats
        return generate_latest(self.registry)
