"""Prometheus metrics of `tunesmith serve` (GET /metrics), named after vLLM's with a `tunesmith:` prefix.

Every series has a `model_name` label (the served run or adapter; a name the server does not serve is counted under
the served run's, so a client can't grow the label set). Each server has its own registry.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class Timing:
    """One answered request's times, in seconds (None where it did not get that far)."""

    queue_s: float | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    inter_token_s: tuple[float, ...] = ()


class Metrics:
    """The server's counters, gauges and histograms."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        label = ["model_name"]

        def histogram(name: str, text: str) -> Histogram:
            return Histogram(f"tunesmith:{name}", text, label, buckets=LATENCY_BUCKETS, registry=self.registry)

        self.ttft = histogram("time_to_first_token_seconds", "Time from arrival to the first generated token")
        self.itl = histogram("inter_token_latency_seconds", "Time between two generated pieces of one answer")
        self.e2e = histogram("e2e_request_latency_seconds", "Time from arrival to the last byte of the answer")
        self.queue = histogram("request_queue_time_seconds", "Time a request waited before its first forward pass")
        self.prompt_tokens = Counter("tunesmith:prompt_tokens", "Prompt tokens of answered requests", label,
                                     registry=self.registry)
        self.generation_tokens = Counter("tunesmith:generation_tokens", "Generated tokens", label,
                                         registry=self.registry)
        self.success = Counter("tunesmith:request_success", "Requests answered, by finish reason",
                               [*label, "finished_reason"], registry=self.registry)
        self.errors = Counter("tunesmith:request_errors", "Requests refused or failed, by HTTP status code",
                              [*label, "code"], registry=self.registry)
        self.running = Gauge("tunesmith:num_requests_running", "Requests in the running batch", label,
                             registry=self.registry)
        self.waiting = Gauge("tunesmith:num_requests_waiting", "Requests waiting for a place in the batch", label,
                             registry=self.registry)

    def answered(self, model: str, finish_reason: str, prompt_tokens: int, completion_tokens: int,
                 timing: Timing) -> None:
        """Count one answered request with its token counts and latencies."""
        self.success.labels(model, finish_reason).inc()
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.generation_tokens.labels(model).inc(completion_tokens)
        for histogram, value in ((self.queue, timing.queue_s), (self.ttft, timing.ttft_s), (self.e2e, timing.e2e_s)):
            if value is not None:
                histogram.labels(model).observe(max(value, 0.0))
        for gap in timing.inter_token_s:
            self.itl.labels(model).observe(max(gap, 0.0))

    def failed(self, model: str, status: int) -> None:
        """Count one request answered with an error status."""
        self.errors.labels(model, str(status)).inc()

    def set_load(self, model: str, running: int, waiting: int) -> None:
        self.running.labels(model).set(running)
        self.waiting.labels(model).set(waiting)

    def scrape(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
