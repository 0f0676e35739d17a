"""Prometheus collectors: every family of vLLM's production metrics that applies to this server,
counted exactly, under our `internvl:` prefix, or (metrics_names=vllm) under vLLM's exact names and
labels, so dashboards and alerts built for vLLM work unchanged. Under our prefix a family has
vLLM's name but for Prometheus' conventions (CONVENTIONAL_NAMES). Our own families (image tokens,
errors by type, paused requests, ...) keep the `internvl:` prefix in both modes.

What is counted, and when (one request = one API request, whatever its n):
- A request's prompt figures (prompt, image, cached, recomputed tokens, tokens by source) count at
  its first output; generated tokens as they come; TTFT and inter-token latency as they happen.
- request_success counts a request once as it ends: stop or length when it completes (length if any
  choice was cut short); abort when its client leaves, error when it fails, after its first output.
  A request refused before it reached the engine is only an error (internvl:request_errors_total).
- The per-request histograms (lengths, parameters, e2e, queue, prefill, decode, inference and
  per-token times) observe each completed request once, so their _count is the number of stop and
  length finishes. Phase times are the engine's: queue = arrival in the engine -> first
  scheduled; prefill = then -> first token; decode = first -> last token; inference = prefill +
  decode (preemptions included). TTFT and e2e count from the request's arrival at the server.
- The engine's own counters are read at scrape time (server/engine_metrics.py).

vLLM families left out, because nothing here produces them: speculative decoding (spec_decode_*),
LoRA (lora_requests_info), KV connectors and offloading (external_prefix_cache_*, nixl_*, kv
transfer), sleep mode (engine_sleep_state), NaN detection in logits (corrupted_requests, behind
VLLM_COMPUTE_NANS_IN_LOGITS), the sampled KV block residency histograms (kv_block_lifetime_seconds,
kv_block_idle_before_evict_seconds, kv_block_reuse_gap_seconds, behind --kv-cache-metrics), the
estimated FLOPs and bytes (estimated_*_per_gpu_total, behind --enable-mfu-metrics), and V0's
swapping (num_requests_swapped, cpu_cache_usage_perc). In the vllm mode the names vLLM deprecated
but older vLLM dashboards still query (gpu_cache_usage_perc, gpu_prefix_cache_queries and _hits,
time_per_output_token_seconds) are exported too.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from model_runtime.engine_client import EngineClient
from model_runtime.request import RequestOutput
from server.engine_metrics import OWN_PREFIX, EngineCollector
from server.loop_monitor import LoopLagMonitor

NameMode = Literal["internvl", "vllm"]
PREFIX = OWN_PREFIX
VLLM_PREFIX = "vllm:"
DISCONNECTED = "client_disconnected"  # server.chat's error type for a client that left: an abort
FINISHED_REASONS = ("stop", "length", "abort", "error")
PROMPT_SOURCES = ("local_compute", "local_cache_hit", "external_kv_transfer")

# vLLM's bucket bounds, so quantiles compare with a vLLM server's.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
N_BUCKETS = (1, 2, 5, 10, 20)
# vLLM names that break Prometheus' conventions (a histogram named *_total), spelled by them under
# our prefix; the vllm mode keeps vLLM's.
CONVENTIONAL_NAMES = {"iteration_tokens_total": "iteration_tokens"}

# vLLM's help texts, by family name (without prefix).
HELP = {
    "time_to_first_token_seconds": "Histogram of time to first token in seconds.",
    "inter_token_latency_seconds": "Histogram of inter-token latency in seconds.",
    "time_per_output_token_seconds": "DEPRECATED: use vllm:inter_token_latency_seconds.",
    "e2e_request_latency_seconds": "Histogram of e2e request latency in seconds.",
    "request_queue_time_seconds": "Histogram of time spent in WAITING phase for request.",
    "request_inference_time_seconds": "Histogram of time spent in RUNNING phase for request.",
    "request_prefill_time_seconds": "Histogram of time spent in PREFILL phase for request.",
    "request_decode_time_seconds": "Histogram of time spent in DECODE phase for request.",
    "request_time_per_output_token_seconds": "Histogram of time_per_output_token_seconds per request.",
    "request_prompt_tokens": "Number of prefill tokens processed.",
    "request_generation_tokens": "Number of generation tokens processed.",
    "request_max_num_generation_tokens": "Histogram of maximum number of requested generation tokens.",
    "request_params_max_tokens": "Histogram of the max_tokens request parameter.",
    "request_params_n": "Histogram of the n request parameter.",
    "request_prefill_kv_computed_tokens": "Histogram of new KV tokens computed during prefill "
    "(excluding cached tokens).",
    "prompt_tokens": "Number of prefill tokens processed (image and video tokens included).",
    "generation_tokens": "Number of generation tokens processed.",
    "prompt_tokens_cached": "Number of cached prompt tokens (local + external).",
    "prompt_tokens_recomputed": "Number of cached prompt tokens that were recomputed.",
    "prompt_tokens_by_source": "Number of prompt tokens by source.",
    "request_success": "Count of successfully processed requests.",
}


def buckets_1_2_5(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's bounds for token-count histograms)."""
    bounds: list[int] = []
    scale = 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_value:
                return tuple(bounds)
            bounds.append(mantissa * scale)
        scale *= 10


@dataclass(frozen=True)
class Naming:
    """How the vLLM families are named and labelled in one mode."""

    prefix: str
    labels: tuple[str, ...]
    values: tuple[str, ...]
    reason_label: str

    @classmethod
    def of(cls, mode: NameMode, model_name: str) -> Naming:
        if mode == "vllm":
            return cls(VLLM_PREFIX, ("model_name", "engine"), (model_name, "0"), "finished_reason")
        return cls(PREFIX, ("model_name",), (model_name,), "finish_reason")

    @property
    def vllm(self) -> bool:
        return self.prefix == VLLM_PREFIX

    def name(self, family: str) -> str:
        """The full name of a vLLM family (given as vLLM names it, without prefix)."""
        return self.prefix + (family if self.vllm else CONVENTIONAL_NAMES.get(family, family))


class Metrics:
    """The server's private registry and the per-request instruments, labelled with the model name.

    `names`: 'internvl' (our prefix, label model_name) or 'vllm' (vLLM's exact names and labels)."""

    def __init__(
        self,
        model_name: str,
        engine: EngineClient,
        loop_lag: LoopLagMonitor | None = None,
        *,
        names: NameMode = "internvl",
    ) -> None:
        self.model_name = model_name
        self.names = names
        self.registry = r = CollectorRegistry()
        naming = Naming.of(names, model_name)
        lengths = buckets_1_2_5(engine.info.max_model_len)

        def histogram(name: str, buckets: Sequence[float]) -> Any:
            family = Histogram(naming.name(name), HELP[name], naming.labels, buckets=buckets, registry=r)
            return family.labels(*naming.values)

        def counter(name: str, *extra: str) -> Any:
            family = Counter(naming.name(name), HELP[name], [*naming.labels, *extra], registry=r)
            return family if extra else family.labels(*naming.values)

        self.ttft = histogram("time_to_first_token_seconds", TTFT_BUCKETS)
        self._itl = [histogram("inter_token_latency_seconds", ITL_BUCKETS)]
        if naming.vllm:  # its older vLLM name, which older vLLM dashboards query
            self._itl.append(histogram("time_per_output_token_seconds", ITL_BUCKETS))
        self.e2e = histogram("e2e_request_latency_seconds", REQUEST_LATENCY_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds", REQUEST_LATENCY_BUCKETS)
        self.inference_time = histogram("request_inference_time_seconds", REQUEST_LATENCY_BUCKETS)
        self.prefill_time = histogram("request_prefill_time_seconds", REQUEST_LATENCY_BUCKETS)
        self.decode_time = histogram("request_decode_time_seconds", REQUEST_LATENCY_BUCKETS)
        self.time_per_output_token = histogram("request_time_per_output_token_seconds", ITL_BUCKETS)
        self.request_prompt_tokens = histogram("request_prompt_tokens", lengths)
        self.request_generation_tokens = histogram("request_generation_tokens", lengths)
        self.request_max_num_generation_tokens = histogram("request_max_num_generation_tokens", lengths)
        self.request_params_max_tokens = histogram("request_params_max_tokens", lengths)
        self.request_params_n = histogram("request_params_n", N_BUCKETS)
        self.request_prefill_kv_computed_tokens = histogram("request_prefill_kv_computed_tokens", lengths)
        self.prompt_tokens = counter("prompt_tokens")
        self.generation_tokens = counter("generation_tokens")
        self.prompt_tokens_cached = counter("prompt_tokens_cached")
        self.prompt_tokens_recomputed = counter("prompt_tokens_recomputed")
        by_source = counter("prompt_tokens_by_source", "source")
        self._by_source = {source: by_source.labels(*naming.values, source) for source in PROMPT_SOURCES}
        success = counter("request_success", naming.reason_label)
        self._success = {reason: success.labels(*naming.values, reason) for reason in FINISHED_REASONS}

        def own(name: str, doc: str) -> Any:
            return Counter(PREFIX + name, doc, ["model_name"], registry=r).labels(model_name)

        self.image_tokens = own("image_tokens", "Image and video tokens in prompts.")
        self._errors = Counter(
            PREFIX + "request_errors",
            "Failed requests by error type.",
            ["model_name", "error_type"],
            registry=r,
        )
        self._slow_clients = own(
            "slow_client_aborts",
            "Streams closed because their client read nothing for stream_send_timeout_s.",
        )
        r.register(EngineCollector(engine, model_name, naming, loop_lag))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def track(self) -> RequestTracker:
        return RequestTracker(self)

    def success(self, finish_reason: str) -> None:
        self._success[finish_reason].inc()

    def error(self, error_type: str) -> None:
        self._errors.labels(self.model_name, error_type).inc()

    def slow_client(self) -> None:
        self._slow_clients.inc()

    def inter_token(self, seconds: float) -> None:
        for histogram in self._itl:
            histogram.observe(seconds)

    def prompt(self, out: RequestOutput) -> None:
        """A request's prompt figures, from its first output (vLLM's invariant: local_compute +
        local_cache_hit + external_kv_transfer - recomputed = prompt tokens)."""
        cached, recomputed = out.cached_tokens, out.recomputed_tokens
        self.prompt_tokens.inc(out.prompt_tokens)
        self.image_tokens.inc(out.image_tokens)
        self.prompt_tokens_cached.inc(cached)
        self.prompt_tokens_recomputed.inc(recomputed)
        self._by_source["local_compute"].inc(out.prompt_tokens - cached)
        self._by_source["local_cache_hit"].inc(cached + recomputed)

    def completed(
        self, last: RequestOutput, finish_reason: str, e2e: float, queue_time: float | None
    ) -> None:
        """A completed request's observations; `last` is its finished output."""
        self.success(finish_reason)
        self.e2e.observe(e2e)
        if queue_time is not None:
            self.queue_time.observe(queue_time)
        self.request_prompt_tokens.observe(last.prompt_tokens)
        self.request_generation_tokens.observe(last.completion_tokens)
        self.request_prefill_kv_computed_tokens.observe(last.prompt_tokens - last.cached_tokens)
        stats = last.stats
        if stats is None:  # an engine that reports no per-request figures
            return
        self.request_params_n.observe(stats.n)
        self.request_params_max_tokens.observe(stats.max_tokens)
        self.request_max_num_generation_tokens.observe(stats.max_choice_tokens)
        self.prefill_time.observe(stats.prefill_time)
        self.decode_time.observe(stats.decode_time)
        self.inference_time.observe(stats.prefill_time + stats.decode_time)
        if stats.max_choice_tokens > 1:  # the first token is the prefill's
            self.time_per_output_token.observe(stats.decode_time / (stats.max_choice_tokens - 1))


class RequestTracker:
    """One request's metrics, fed by each engine output; ends with finished() or failed()."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics
        self._start = time.monotonic()
        self._last_token: float | None = None
        self._queue_time: float | None = None
        self._started = False  # an output arrived: the request reached the engine
        self._completion_tokens = 0
        self._done = False

    def on_output(self, out: RequestOutput) -> None:
        now = time.monotonic()
        if self._queue_time is None:
            self._queue_time = out.queue_time
        # Tokens count as they are computed, so requests that end in a disconnect or a failure count too.
        if not self._started:
            self._started = True
            self._m.prompt(out)
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
            self._m.inter_token(now - self._last_token)
        self._last_token = now

    def finished(self, last: RequestOutput, finish_reasons: Iterable[str]) -> None:
        if self._done:
            return
        self._done = True
        # One count per request; with n > 1, "length" if any choice was cut short.
        reason = "length" if "length" in set(finish_reasons) else "stop"
        self._m.completed(last, reason, time.monotonic() - self._start, self._queue_time)

    def failed(self, error_type: str) -> None:
        if self._done:
            return
        self._done = True
        self._m.error(error_type)
        if self._started:  # it ended in the engine, rather than being refused on its way there
            self._m.success("abort" if error_type == DISCONNECTED else "error")
