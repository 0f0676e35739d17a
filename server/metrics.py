"""Prometheus collectors, named like vLLM's with our own prefix so dashboards adapt by a prefix."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from model_runtime.engine_client import EngineClient
from model_runtime.request import RequestOutput
from server.loop_monitor import LoopLagMonitor

PREFIX = "internvl:"
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)


class _EngineGauges(Collector):
    """Reads `engine.stats()` at scrape time, so the gauges are never stale."""

    def __init__(self, engine: EngineClient, model_name: str, loop_lag: LoopLagMonitor | None) -> None:
        self._engine = engine
        self._model_name = model_name
        self._loop_lag = loop_lag

    def collect(self) -> Iterable[Metric]:
        stats = self._engine.stats()
        values = (
            ("num_requests_running", "Requests being generated.", stats.num_running),
            ("num_requests_waiting", "Requests waiting to be scheduled.", stats.num_waiting),
            (
                "num_requests_paused",
                "Running requests paused because their client is not reading.",
                stats.num_paused,
            ),
            ("kv_cache_usage_perc", "Fraction of the KV cache in use (0-1).", stats.cache_usage),
            ("vision_cache_bytes", "Bytes held by the vision-embedding cache.", stats.vision_cache_bytes),
        )
        if self._loop_lag is not None:
            values += (
                (
                    "event_loop_lag_seconds",
                    "Worst event-loop wake-up lag of the last 10 s.",
                    self._loop_lag.lag_s,
                ),
            )
        for name, doc, value in values:
            gauge = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            gauge.add_metric([self._model_name], float(value))
            yield gauge


class Metrics:
    """The server's private registry and the per-request instruments, labelled with the model name."""

    def __init__(self, model_name: str, engine: EngineClient, loop_lag: LoopLagMonitor | None = None) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        r = self.registry

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            return Histogram(PREFIX + name, doc, ["model_name"], buckets=buckets, registry=r).labels(
                model_name
            )

        def counter(name: str, doc: str) -> Any:
            return Counter(PREFIX + name, doc, ["model_name"], registry=r).labels(model_name)

        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between output tokens.", _ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "End-to-end request latency.", _LATENCY_BUCKETS)
        self.queue_time = histogram(
            "request_queue_time_seconds", "Time waiting to be scheduled.", _LATENCY_BUCKETS
        )
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens, image and video tokens included.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        self.image_tokens = counter("image_tokens", "Image and video tokens in prompts.")
        self._success = Counter(
            PREFIX + "request_success",
            "Finished requests by finish reason.",
            ["model_name", "finish_reason"],
            registry=r,
        )
        self._errors = Counter(
            PREFIX + "request_errors",
            "Failed requests by error type.",
            ["model_name", "error_type"],
            registry=r,
        )
        self._slow_clients = counter(
            "slow_client_aborts",
            "Streams closed because their client read nothing for stream_send_timeout_s.",
        )
        r.register(_EngineGauges(engine, model_name, loop_lag))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def track(self) -> RequestTracker:
        return RequestTracker(self)

    def success(self, finish_reason: str) -> None:
        self._success.labels(self.model_name, finish_reason).inc()

    def error(self, error_type: str) -> None:
        self._errors.labels(self.model_name, error_type).inc()

    def slow_client(self) -> None:
        self._slow_clients.inc()


class RequestTracker:
    """Timings of one request, fed by each engine output."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics
        self._start = time.monotonic()
        self._last_token: float | None = None
        self._queue_seen = False
        self._prompt_counted = False
        self._completion_tokens = 0
        self._done = False

    def on_output(self, out: RequestOutput) -> None:
        now = time.monotonic()
        if out.queue_time is not None and not self._queue_seen:
            self._queue_seen = True
            self._m.queue_time.observe(out.queue_time)
        # Tokens count as they are computed, so requests that end in a disconnect or a failure count too.
        if not self._prompt_counted:
            self._prompt_counted = True
            self._m.prompt_tokens.inc(out.prompt_tokens)
            self._m.image_tokens.inc(out.image_tokens)
        if out.completion_tokens > self._completion_tokens:
            self._m.generation_tokens.inc(out.completion_tokens - self._completion_tokens)
            self._completion_tokens = out.completion_tokens
        new_tokens = sum(len(d.token_ids) for d in out.deltas)
        if not new_tokens:
            return
        if self._last_token is None:
            self._m.ttft.observe(now - self._start)
        else:
            # One observation per engine step: with n > 1 every choice advances in the same step.
            self._m.itl.observe(now - self._last_token)
        self._last_token = now

    def finished(self, last: RequestOutput, finish_reasons: Iterable[str]) -> None:
        if self._done:
            return
        self._done = True
        self._m.e2e.observe(time.monotonic() - self._start)
        # One count per request, as vLLM does; with n > 1, "length" if any choice was cut short.
        reasons = set(finish_reasons)
        self._m.success("length" if "length" in reasons else "stop")

    def failed(self, error_type: str) -> None:
        if self._done:
            return
        self._done = True
        self._m.error(error_type)
