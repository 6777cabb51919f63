"""Prometheus series of one server (its own registry), exposed at GET /metrics.

  mamba2_aot_requests_total{status}               API requests by final HTTP status (499: client went away)
  mamba2_aot_prompt_tokens_total                  prompt tokens of requests that ran
  mamba2_aot_generation_tokens_total              tokens generated and returned
  mamba2_aot_time_to_first_token_seconds          arrival -> first token (histogram)
  mamba2_aot_time_per_output_token_seconds        per choice: (last - first token time) / (tokens - 1)
  mamba2_aot_request_duration_seconds             arrival -> last byte
  mamba2_aot_queue_depth, mamba2_aot_slots_busy, mamba2_aot_slots   sequences waiting, slots held, slots
  mamba2_aot_prefix_cache_{lookups,hits,tokens_skipped,inserts,evictions}_total, _bytes
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class _Live(Collector):
    """Gauges read from the scheduler and the prefix cache at scrape time."""

    def __init__(self, service):
        self.service = service

    def collect(self):
        sched = self.service.scheduler
        for name, doc, value in (("queue_depth", "Sequences waiting for a slot", sched.queued if sched else 0),
                                 ("slots_busy", "Slots held by a sequence", sched.busy if sched else 0),
                                 ("slots", "Slots (the decode batch)", self.service.config.slots)):
            yield GaugeMetricFamily(f"mamba2_aot_{name}", doc, value=value)
        model = self.service.model
        cache = None if model is None else model.prefix_cache
        if cache is None:
            return
        stats = cache.stats
        for name, doc in (("lookups", "Prefix-cache lookups"), ("hits", "Prefix-cache hits"),
                          ("tokens_skipped", "Prompt tokens not prefilled thanks to the cache"),
                          ("inserts", "States inserted"), ("evictions", "States evicted")):
            yield CounterMetricFamily(f"mamba2_aot_prefix_cache_{name}", doc, value=getattr(stats, name))
        yield GaugeMetricFamily("mamba2_aot_prefix_cache_bytes", "Bytes of cached states", value=cache.nbytes)


class Metrics:
    def __init__(self, service):
        disable_created_metrics()  # no *_created series: they double the output for nothing here
        r = self.registry = CollectorRegistry()
        self.requests = Counter("mamba2_aot_requests", "API requests by final HTTP status", ["status"], registry=r)
        self.prompt_tokens = Counter("mamba2_aot_prompt_tokens", "Prompt tokens of requests that ran", registry=r)
        self.generation_tokens = Counter("mamba2_aot_generation_tokens", "Generated tokens returned", registry=r)
        self.ttft = Histogram("mamba2_aot_time_to_first_token_seconds", "Arrival to first token",
                              buckets=_LATENCY, registry=r)
        self.tpot = Histogram("mamba2_aot_time_per_output_token_seconds", "Time per output token after the first",
                              buckets=_PER_TOKEN, registry=r)
        self.duration = Histogram("mamba2_aot_request_duration_seconds", "Arrival to last byte",
                                  buckets=_LATENCY, registry=r)
        r.register(_Live(service))

    def record(self, exchange, status: int, ttft: float | None, total: float) -> None:
        self.requests.labels(status=str(status)).inc()
        self.duration.observe(total)
        if exchange.choices:
            self.prompt_tokens.inc(exchange.prompt_tokens)
            self.generation_tokens.inc(exchange.completion_tokens)
        if ttft is not None:
            self.ttft.observe(ttft)
        for c in exchange.choices:
            if len(c.tokens) > 1 and c.first_at is not None:
                self.tpot.observe((c.last_at - c.first_at) / (len(c.tokens) - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
