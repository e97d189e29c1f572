"""The server's Prometheus series: HTTP requests, latencies and tokens, and the engine's queue and outcomes."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily

from .request import Backend

__all__ = ["Metrics", "OutcomeCollector", "TTFT_BUCKETS", "LATENCY_BUCKETS"]

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    """Prometheus series in a registry of this app's own (two apps in one process do not collide)."""

    def __init__(self, backend: Backend):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("maskpro_serve_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("maskpro_serve_request_latency_seconds", "Time from request to last byte",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("maskpro_serve_time_to_first_token_seconds", "Time from request to first token",
                              ["endpoint"], buckets=TTFT_BUCKETS, registry=r)
        self.generated = Counter("maskpro_serve_generated_tokens", "Completion tokens generated", registry=r)
        self.prompt = Counter("maskpro_serve_prompt_tokens", "Prompt tokens processed", registry=r)
        self.in_flight = Gauge("maskpro_serve_requests_in_flight", "HTTP requests being handled", registry=r)
        queue = Gauge("maskpro_serve_queue_depth", "Requests waiting for a batch slot", registry=r)
        queue.set_function(lambda: backend.stats().get("queue_depth", 0))
        running = Gauge("maskpro_serve_running_batch_size", "Requests in the running decode batch", registry=r)
        running.set_function(lambda: backend.stats().get("running", 0))
        r.register(OutcomeCollector(backend))


class OutcomeCollector:
    """How the engine ended requests (stop, length, request_timeout, client_closed_request, ...)."""

    def __init__(self, backend: Backend):
        self.backend = backend

    def describe(self):
        return []

    def collect(self):
        family = CounterMetricFamily("maskpro_serve_engine_requests", "Requests the engine ended, by outcome",
                                     labels=["outcome"])
        for outcome, n in sorted(self.backend.stats().get("outcomes", {}).items()):
            family.add_metric([outcome], n)
        yield family
