"""The metric families read from `engine.stats()` at scrape time: scheduler and cache gauges, the
engine's counters (prefix and multimodal cache, preemptions) and its tokens-per-step histogram.

Counters count from when the collector was built (the server begins serving): the engine's warm-up
requests ran before and are not counted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from model_runtime.engine_client import EngineClient
from model_runtime.request import ITERATION_TOKEN_BUCKETS, EngineStats
from server.loop_monitor import LoopLagMonitor

if TYPE_CHECKING:
    from server.metrics import Naming

OWN_PREFIX = "internvl:"
WAITING_REASONS = ("capacity", "deferred")  # nothing here defers a request: "deferred" stays 0

# vLLM's counters: (name, help, the EngineStats field they export).
COUNTERS = (
    (
        "prefix_cache_queries",
        "Prefix cache queries, in terms of number of queried tokens.",
        "prefix_cache_queries",
    ),
    ("prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", "prefix_cache_hits"),
    (
        "mm_cache_queries",
        "Multi-modal cache queries, in terms of number of queried items (images, video frames).",
        "mm_cache_queries",
    ),
    ("mm_cache_hits", "Multi-modal cache hits, in terms of number of cached items.", "mm_cache_hits"),
    ("num_preemptions", "Cumulative number of preemption from the engine.", "num_preemptions"),
)
# Names vLLM deprecated that older vLLM dashboards still query: exported in the vllm mode only.
DEPRECATED_COUNTERS = (
    ("gpu_prefix_cache_queries", "DEPRECATED: use vllm:prefix_cache_queries.", "prefix_cache_queries"),
    ("gpu_prefix_cache_hits", "DEPRECATED: use vllm:prefix_cache_hits.", "prefix_cache_hits"),
)


class EngineCollector(Collector):
    """Reads `engine.stats()` at scrape time, so the gauges are never stale and the counters exact."""

    def __init__(
        self, engine: EngineClient, model_name: str, naming: Naming, loop_lag: LoopLagMonitor | None
    ) -> None:
        self._engine = engine
        self._model_name = model_name
        self._naming = naming
        self._loop_lag = loop_lag
        self._base = dataclasses.replace(engine.stats())  # a copy: a fake engine may mutate its own

    def collect(self) -> Iterable[Metric]:
        stats, naming = self._engine.stats(), self._naming
        yield self._gauge(
            "num_requests_running", "Number of requests in model execution batches.", stats.num_running
        )
        yield self._gauge(
            "num_requests_waiting", "Number of requests waiting to be processed.", stats.num_waiting
        )
        yield self._waiting_by_reason(stats)
        yield self._gauge(
            "kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", stats.cache_usage
        )
        yield self._cache_config(stats)
        for name, doc, field in COUNTERS + (DEPRECATED_COUNTERS if naming.vllm else ()):
            yield self._counter(name, doc, getattr(stats, field) - getattr(self._base, field))
        yield self._iteration_tokens(stats)
        if naming.vllm:
            yield self._gauge(
                "gpu_cache_usage_perc", "DEPRECATED: use vllm:kv_cache_usage_perc.", stats.cache_usage
            )
        yield from self._own(stats)

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(self._naming.name(name), doc, labels=self._naming.labels)
        family.add_metric(self._naming.values, float(value))
        return family

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        family = CounterMetricFamily(self._naming.name(name), doc, labels=self._naming.labels)
        family.add_metric(self._naming.values, float(value))
        return family

    def _waiting_by_reason(self, stats: EngineStats) -> GaugeMetricFamily:
        naming = self._naming
        family = GaugeMetricFamily(
            naming.name("num_requests_waiting_by_reason"),
            "Number of waiting requests by reason: 'capacity' = waiting for room to run "
            "(nothing is 'deferred' here). Sum of all reasons equals num_requests_waiting.",
            labels=[*naming.labels, "reason"],
        )
        for reason in WAITING_REASONS:
            family.add_metric(
                [*naming.values, reason], float(stats.num_waiting if reason == "capacity" else 0)
            )
        return family

    def _cache_config(self, stats: EngineStats) -> GaugeMetricFamily:
        info = {
            "block_size": str(stats.block_size),
            "cache_dtype": stats.cache_dtype,
            "enable_prefix_caching": str(stats.enable_prefix_caching),
            "num_gpu_blocks": str(stats.cache_total_blocks),
        }
        # vLLM labels this family with the cache config and the engine only; ours with model_name.
        info |= {"engine": "0"} if self._naming.vllm else {"model_name": self._model_name}
        family = GaugeMetricFamily(
            self._naming.name("cache_config_info"),
            "Information of the LLMEngine CacheConfig",
            labels=list(info),
        )
        family.add_metric(list(info.values()), 1.0)
        return family

    def _iteration_tokens(self, stats: EngineStats) -> HistogramMetricFamily:
        empty = (0,) * (len(ITERATION_TOKEN_BUCKETS) + 1)
        now = stats.iteration_tokens_buckets or empty
        then = self._base.iteration_tokens_buckets or empty
        buckets, total = [], 0
        for bound, count, before in zip((*ITERATION_TOKEN_BUCKETS, float("inf")), now, then, strict=True):
            total += count - before
            buckets.append((floatToGoString(bound), float(total)))
        family = HistogramMetricFamily(
            self._naming.name("iteration_tokens_total"),
            "Histogram of number of tokens per engine_step.",
            labels=self._naming.labels,
        )
        family.add_metric(
            self._naming.values, buckets, float(stats.iteration_tokens_sum - self._base.iteration_tokens_sum)
        )
        return family

    def _own(self, stats: EngineStats) -> Iterable[Metric]:
        """Our own gauges, under our prefix in both modes."""
        values = [
            (
                "num_requests_paused",
                "Running requests paused because their client is not reading.",
                stats.num_paused,
            ),
            ("vision_cache_bytes", "Bytes held by the vision-embedding cache.", stats.vision_cache_bytes),
        ]
        if self._loop_lag is not None:
            lag = self._loop_lag.lag_s
            values.append(("event_loop_lag_seconds", "Worst event-loop wake-up lag of the last 10 s.", lag))
        for name, doc, value in values:
            gauge = GaugeMetricFamily(OWN_PREFIX + name, doc, labels=["model_name"])
            gauge.add_metric([self._model_name], float(value))
            yield gauge
