"""Prometheus metrics of the serving engine, in a registry of their own.

A private `CollectorRegistry` (not the process-global default) lets several servers live in one
process (tests) without "duplicated timeseries" errors. Request-level observations come from the
engine thread as outputs arrive; engine-level gauges are refreshed from an `EngineStats`
snapshot when /metrics is scraped. prometheus_client metrics are thread-safe.
"""

from __future__ import annotations

from typing import Any, Optional

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Latency buckets (seconds) spanning a fast decode step on a GPU to a long prefill on a CPU.
_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)

_PREFIX = "infinite_llm"


class ServingMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]
        inst = ["model_name", "instance"]
        r = self.registry
        self.num_running = Gauge(f"{_PREFIX}_num_requests_running", "Requests in the running batch", labels, registry=r)
        self.num_waiting = Gauge(f"{_PREFIX}_num_requests_waiting", "Requests in the waiting queue", labels, registry=r)
        self.kv_blocks_total = Gauge(f"{_PREFIX}_kv_blocks_total", "KV blocks of an instance", inst, registry=r)
        self.kv_blocks_used = Gauge(f"{_PREFIX}_kv_blocks_used", "KV blocks in use on an instance", inst, registry=r)
        self.kv_blocks_lent = Gauge(
            f"{_PREFIX}_kv_blocks_lent", "Blocks of an instance holding other instances' KV", inst, registry=r
        )
        self.kv_blocks_borrowed = Gauge(
            f"{_PREFIX}_kv_blocks_borrowed", "Blocks an instance's requests hold on other instances", inst, registry=r
        )
        self.ttft = Histogram(
            f"{_PREFIX}_time_to_first_token_seconds", "Time to first token", labels, buckets=_TTFT_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            f"{_PREFIX}_time_per_output_token_seconds", "Mean time per output token after the first, per request",
            labels, buckets=_TPOT_BUCKETS, registry=r,
        )
        self.e2e = Histogram(
            f"{_PREFIX}_e2e_request_latency_seconds", "Arrival to last token", labels, buckets=_E2E_BUCKETS, registry=r
        )
        # Counter names get the `_total` suffix from prometheus_client.
        self.prompt_tokens = Counter(f"{_PREFIX}_prompt_tokens", "Prefilled prompt tokens", labels, registry=r)
        self.generation_tokens = Counter(f"{_PREFIX}_generation_tokens", "Generated tokens", labels, registry=r)
        self.requests_finished = Counter(
            f"{_PREFIX}_request_finished", "Finished requests by finish reason", ["model_name", "finish_reason"],
            registry=r,
        )
        self.instance_failures = Counter(
            f"{_PREFIX}_instance_failures", "Instances declared dead", labels, registry=r
        )
        self.recomputed_requests = Counter(
            f"{_PREFIX}_recomputed_requests", "Requests recomputed because an instance holding them died "
            "(re-dispatched from a dead home, or recomputed by a home that lost a creditor)", labels, registry=r,
        )
        self.recovery = Histogram(
            f"{_PREFIX}_failure_recovery_seconds", "From an instance's death being known to the first token of "
            "a request re-dispatched from it", labels, buckets=_TTFT_BUCKETS, registry=r,
        )
        self.instance_up = Gauge(
            f"{_PREFIX}_instance_up", "1 if the instance is alive (or only late), 0 if dead", inst, registry=r
        )
        self._failures_seen = (0, 0, 0)  # failures, recomputed, recovery observations already counted

    # ---------------------------------------------------------------- observations
    def observe_prompt(self, num_tokens: int) -> None:
        self.prompt_tokens.labels(self.model_name).inc(num_tokens)

    def observe_generated(self, num_tokens: int) -> None:
        if num_tokens > 0:
            self.generation_tokens.labels(self.model_name).inc(num_tokens)

    def observe_finished(
        self,
        finish_reason: Optional[str],
        num_output_tokens: int,
        arrival_time: float,
        first_token_time: Optional[float],
        finished_time: Optional[float],
    ) -> None:
        """Record one finished request. Aborted requests count, but stay out of latency histograms."""
        reason = finish_reason or "unknown"
        self.requests_finished.labels(self.model_name, reason).inc()
        if reason == "abort" or first_token_time is None:
            return
        self.ttft.labels(self.model_name).observe(max(0.0, first_token_time - arrival_time))
        if finished_time is not None:
            self.e2e.labels(self.model_name).observe(max(0.0, finished_time - arrival_time))
            if num_output_tokens > 1:
                tpot = (finished_time - first_token_time) / (num_output_tokens - 1)
                self.tpot.labels(self.model_name).observe(max(0.0, tpot))

    def update_engine_stats(self, stats: Any) -> None:
        """Refresh the gauges from an `EngineStats` (num_running, num_waiting, per_instance)."""
        self.num_running.labels(self.model_name).set(stats.num_running)
        self.num_waiting.labels(self.model_name).set(stats.num_waiting)
        for entry in stats.per_instance:
            instance = str(entry["instance"])
            self.kv_blocks_total.labels(self.model_name, instance).set(entry.get("blocks_total", 0))
            self.kv_blocks_used.labels(self.model_name, instance).set(entry.get("blocks_used", 0))
            self.kv_blocks_lent.labels(self.model_name, instance).set(entry.get("blocks_lent", 0))
            self.kv_blocks_borrowed.labels(self.model_name, instance).set(entry.get("blocks_borrowed", 0))
            self.instance_up.labels(self.model_name, instance).set(0 if entry.get("state") == "dead" else 1)
        failures = getattr(stats, "failures", None)
        if failures is not None:
            self._count_failures(failures, getattr(stats, "num_recomputed_on_home", 0))

    def _count_failures(self, failures: Any, recomputed_on_home: int) -> None:
        """Counters from the engine's cumulative figures: add what is new since the last scrape."""
        seen_failures, seen_recomputed, seen_recoveries = self._failures_seen
        recomputed = failures.num_redispatched_requests + recomputed_on_home
        self.instance_failures.labels(self.model_name).inc(max(0, failures.num_instance_failures - seen_failures))
        self.recomputed_requests.labels(self.model_name).inc(max(0, recomputed - seen_recomputed))
        for seconds in failures.recovery_seconds[seen_recoveries:]:
            self.recovery.labels(self.model_name).observe(seconds)
        self._failures_seen = (max(seen_failures, failures.num_instance_failures), max(seen_recomputed, recomputed),
                               max(seen_recoveries, len(failures.recovery_seconds)))

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
