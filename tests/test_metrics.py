"""Metrics: every family counted exactly, under our names and under vLLM's; the Grafana dashboard and
the alert rules query only what the server exports.

Counts are asserted exactly after known traffic: through the app over a FakeEngine (whose requests
report fixed phase times), and over a real tiny engine on CPU (prefix and multimodal cache hits for
repeated prompts, preemptions in a small cache, tokens per step). Nothing here asserts a duration.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from model_runtime.engine_client import ModelInfo
from model_runtime.request import ITERATION_TOKEN_BUCKETS, ChatInput, EngineStats, RequestOutput
from model_runtime.sampling_params import SamplingParams
from server.loop_monitor import LoopLagMonitor
from server.metrics import DISCONNECTED, Metrics, NameMode, buckets_1_2_5
from server.settings import Settings
from tests.fakes import FAKE_INFO, FAKE_PREFILL_S, FAKE_QUEUE_S, FAKE_STEP_S, FakeEngine
from tests.test_api import MODEL, chat, client, drive_until_disconnect, make_app

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = sorted((ROOT / "configs" / "grafana" / "dashboards").glob("*.json"))
ALERTS = ROOT / "configs" / "prometheus-alerts.yml"
MODES: tuple[NameMode, ...] = ("internvl", "vllm")
# What vLLM's own example dashboard (examples/online_serving/prometheus_grafana/grafana.json) and
# its documented alerting queries use: all of it must be there under the vllm names.
VLLM_DASHBOARD_SERIES = {
    "vllm:e2e_request_latency_seconds_bucket",
    "vllm:e2e_request_latency_seconds_sum",
    "vllm:e2e_request_latency_seconds_count",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:time_per_output_token_seconds_bucket",
    "vllm:time_per_output_token_seconds_sum",
    "vllm:time_per_output_token_seconds_count",
    "vllm:inter_token_latency_seconds_bucket",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:time_to_first_token_seconds_bucket",
    "vllm:time_to_first_token_seconds_sum",
    "vllm:time_to_first_token_seconds_count",
    "vllm:gpu_cache_usage_perc",
    "vllm:kv_cache_usage_perc",
    "vllm:request_prompt_tokens_bucket",
    "vllm:request_generation_tokens_bucket",
    "vllm:request_success_total",
    "vllm:request_queue_time_seconds_sum",
    "vllm:request_prefill_time_seconds_sum",
    "vllm:request_decode_time_seconds_sum",
    "vllm:request_max_num_generation_tokens_sum",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:gpu_prefix_cache_queries_total",
    "vllm:gpu_prefix_cache_hits_total",
    "vllm:num_preemptions_total",
    "vllm:iteration_tokens_total_bucket",
    "vllm:mm_cache_queries_total",
    "vllm:mm_cache_hits_total",
    "vllm:cache_config_info",
}
# Every family of vLLM's production metrics that applies here (server/metrics.py lists those that
# do not), without its prefix, and its type.
VLLM_FAMILIES = {
    "num_requests_running": "gauge",
    "num_requests_waiting": "gauge",
    "num_requests_waiting_by_reason": "gauge",
    "kv_cache_usage_perc": "gauge",
    "cache_config_info": "gauge",
    "prefix_cache_queries": "counter",
    "prefix_cache_hits": "counter",
    "mm_cache_queries": "counter",
    "mm_cache_hits": "counter",
    "num_preemptions": "counter",
    "prompt_tokens": "counter",
    "prompt_tokens_by_source": "counter",
    "prompt_tokens_cached": "counter",
    "prompt_tokens_recomputed": "counter",
    "generation_tokens": "counter",
    "request_success": "counter",
    "request_prompt_tokens": "histogram",
    "request_generation_tokens": "histogram",
    "iteration_tokens_total": "histogram",
    "request_max_num_generation_tokens": "histogram",
    "request_params_n": "histogram",
    "request_params_max_tokens": "histogram",
    "request_prefill_kv_computed_tokens": "histogram",
    "time_to_first_token_seconds": "histogram",
    "inter_token_latency_seconds": "histogram",
    "request_time_per_output_token_seconds": "histogram",
    "e2e_request_latency_seconds": "histogram",
    "request_queue_time_seconds": "histogram",
    "request_inference_time_seconds": "histogram",
    "request_prefill_time_seconds": "histogram",
    "request_decode_time_seconds": "histogram",
}
VLLM_DEPRECATED = {
    "gpu_cache_usage_perc": "gauge",
    "gpu_prefix_cache_queries": "counter",
    "gpu_prefix_cache_hits": "counter",
    "time_per_output_token_seconds": "histogram",
}
OWN_FAMILIES = {
    "internvl:image_tokens",
    "internvl:request_errors",
    "internvl:slow_client_aborts",
    "internvl:num_requests_paused",
    "internvl:vision_cache_bytes",
    "internvl:event_loop_lag_seconds",
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- reading a scrape -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scrape:
    """A parsed /metrics text, read by sample name and labels, in one name mode."""

    text: str
    mode: NameMode

    @functools.cached_property
    def families(self) -> dict[str, Any]:
        """By name; prometheus_client's *_created series (one per counter and histogram) left out."""
        families = text_string_to_metric_families(self.text)
        return {f.name: f for f in families if not f.name.endswith("_created")}

    @functools.cached_property
    def sample_names(self) -> set[str]:
        return {s.name for f in self.families.values() for s in f.samples}

    def name(self, family: str) -> str:
        """A vLLM family's name (or one of its samples') in this mode: vLLM's histogram named
        iteration_tokens_total is iteration_tokens under our prefix."""
        if self.mode == "vllm":
            return "vllm:" + family
        return "internvl:" + re.sub(r"^iteration_tokens_total", "iteration_tokens", family)

    @property
    def reason(self) -> str:
        return "finished_reason" if self.mode == "vllm" else "finish_reason"

    def get(self, sample: str, **labels: str) -> float:
        """The one sample named `sample` (a vLLM family's sample unless it has a prefix) whose labels
        include `labels`."""
        full = sample if ":" in sample else self.name(sample)
        found = [
            s.value
            for f in self.families.values()
            for s in f.samples
            if s.name == full and labels.items() <= s.labels.items()
        ]
        assert len(found) == 1, f"{full}{labels}: {len(found)} samples"
        return found[0]

    def histogram(self, family: str) -> tuple[float, float]:
        """(_count, _sum) of a vLLM histogram family."""
        return self.get(f"{family}_count"), self.get(f"{family}_sum")


def scrape(metrics: Metrics) -> Scrape:
    return Scrape(metrics.render().decode(), metrics.names)  # type: ignore[arg-type]


def app_for(engine: FakeEngine, names: NameMode, monkeypatch: pytest.MonkeyPatch) -> FastAPI:
    # The name mode reaches Metrics through create_app; patched in too, so this holds however
    # server/app.py passes the setting on.
    monkeypatch.setattr("server.app.Metrics", functools.partial(Metrics, names=names))
    return make_app(engine, metrics_names=names)


# -- pure -------------------------------------------------------------------------------------------


def test_token_buckets_are_vllms_1_2_5_series() -> None:
    assert buckets_1_2_5(100) == (1, 2, 5, 10, 20, 50, 100)
    assert buckets_1_2_5(4096)[-2:] == (1000, 2000)
    assert ITERATION_TOKEN_BUCKETS == (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def test_the_disconnect_error_type_is_the_servers() -> None:
    from server.chat import DISCONNECTED as CHAT_DISCONNECTED

    assert DISCONNECTED == CHAT_DISCONNECTED


# -- through the app, over a fake engine -----------------------------------------------------------


async def known_traffic(c: httpx.AsyncClient, engine: FakeEngine) -> None:
    """Three completed requests (stop, length, n=2), one refused, one failing after its first token."""
    assert (await c.post("/v1/chat/completions", json=chat("hello world"))).status_code == 200
    r = await c.post("/v1/chat/completions", json=chat("a b c d", stream=True, max_tokens=2))
    assert r.status_code == 200 and '"finish_reason":"length"' in r.text
    assert (await c.post("/v1/chat/completions", json=chat("x y", n=2))).status_code == 200
    assert (await c.post("/v1/chat/completions", json=chat(n=99))).status_code == 400
    engine.fail_after = 1
    assert (await c.post("/v1/chat/completions", json=chat("p q r"))).status_code == 500
    engine.fail_after = None


@pytest.mark.anyio
@pytest.mark.parametrize("names", MODES)
async def test_request_families_count_exactly(names: NameMode, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = FakeEngine()
    async with client(app_for(engine, names, monkeypatch)) as c:
        await known_traffic(c, engine)
        s = Scrape((await c.get("/metrics")).text, names)
    reason = s.reason
    # Each request ends once: three completions, one failure in the engine; the refusal is only an error.
    assert [s.get("request_success_total", **{reason: r}) for r in ("stop", "length", "abort", "error")] == [
        2, 1, 0, 1,
    ]  # fmt: skip
    assert s.get("internvl:request_errors_total", error_type="integer_above_max_value") == 1
    assert s.get("internvl:request_errors_total", error_type="internal_error") == 1
    # Prompt figures count at a request's first output (the failing one's too); tokens as they come.
    assert s.get("prompt_tokens_total") == 2 + 4 + 2 + 3
    assert s.get("generation_tokens_total") == 3 + 2 + 6 + 1
    assert s.get("prompt_tokens_by_source_total", source="local_compute") == 11
    assert s.get("prompt_tokens_by_source_total", source="local_cache_hit") == 0
    assert s.get("prompt_tokens_by_source_total", source="external_kv_transfer") == 0
    assert s.get("prompt_tokens_cached_total") == s.get("prompt_tokens_recomputed_total") == 0
    # One observation per completed request.
    assert s.histogram("request_prompt_tokens") == (3, 2 + 4 + 2)
    assert s.histogram("request_generation_tokens") == (3, 3 + 2 + 6)
    assert s.histogram("request_prefill_kv_computed_tokens") == (3, 8)
    assert s.histogram("request_max_num_generation_tokens") == (3, 3 + 2 + 3)
    assert s.histogram("request_params_n") == (3, 1 + 1 + 2)
    assert s.get("request_params_n_bucket", le="1.0") == 2 and s.get("request_params_n_bucket", le="2.0") == 3
    max_len = FAKE_INFO.max_model_len
    assert s.histogram("request_params_max_tokens") == (3, (max_len - 2) + 2 + (max_len - 2))
    # Phase times as the engine reported them: decode = one step per token after the first.
    decode = FAKE_STEP_S * (2 + 1 + 2)
    assert s.histogram("request_queue_time_seconds") == pytest.approx((3, 3 * FAKE_QUEUE_S))
    assert s.histogram("request_prefill_time_seconds") == pytest.approx((3, 3 * FAKE_PREFILL_S))
    assert s.histogram("request_decode_time_seconds") == pytest.approx((3, decode))
    assert s.histogram("request_inference_time_seconds") == pytest.approx((3, 3 * FAKE_PREFILL_S + decode))
    assert s.histogram("request_time_per_output_token_seconds") == pytest.approx((3, 3 * FAKE_STEP_S))
    assert s.histogram("e2e_request_latency_seconds")[0] == 3
    # TTFT for every request with a token (the failing one too); one ITL per later step.
    assert s.histogram("time_to_first_token_seconds")[0] == 4
    assert s.histogram("inter_token_latency_seconds")[0] == 2 + 1 + 2
    if names == "vllm":
        assert s.histogram("time_per_output_token_seconds")[0] == 2 + 1 + 2


@pytest.mark.anyio
@pytest.mark.parametrize("names", MODES)
async def test_a_client_that_leaves_is_an_abort(names: NameMode, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = FakeEngine(token_delay_s=0.02)
    app = app_for(engine, names, monkeypatch)
    body = httpx.Request("POST", "http://t", json=chat(" ".join(["w"] * 200), stream=True)).read()
    async with app.router.lifespan_context(app):
        await drive_until_disconnect(app, body, disconnect_after_chunks=3)
    s = Scrape(app.state.server.metrics.render().decode(), names)
    assert s.get("request_success_total", **{s.reason: "abort"}) == 1
    assert s.get("internvl:request_errors_total", error_type=DISCONNECTED) == 1
    assert s.histogram("e2e_request_latency_seconds")[0] == 0  # not a completed request
    assert s.get("prompt_tokens_total") == 200


def test_engine_counters_count_from_when_the_server_began() -> None:
    size = len(ITERATION_TOKEN_BUCKETS) + 1
    warm = EngineStats(
        prefix_cache_queries=30, prefix_cache_hits=16, mm_cache_queries=1, num_preemptions=0,
        iteration_tokens_buckets=(3,) + (0,) * (size - 1), iteration_tokens_sum=3,
    )  # fmt: skip
    engine = FakeEngine(engine_stats=warm)
    metrics = Metrics(MODEL, engine)
    buckets = [0] * size
    buckets[0], buckets[4], buckets[-1] = 3 + 5, 2, 1  # five more single tokens, 2 of <= 64, one huge
    engine.engine_stats = EngineStats(
        num_running=3, num_waiting=2, cache_usage=0.5, cache_total_blocks=100, block_size=16,
        prefix_cache_queries=130, prefix_cache_hits=64, mm_cache_queries=4, mm_cache_hits=2,
        num_preemptions=2, iteration_tokens_buckets=tuple(buckets),
        iteration_tokens_sum=3 + 5 + 100 + 20000, cache_dtype="bfloat16", enable_prefix_caching=True,
    )  # fmt: skip
    s = scrape(metrics)
    assert s.get("prefix_cache_queries_total") == 100 and s.get("prefix_cache_hits_total") == 48
    assert s.get("mm_cache_queries_total") == 3 and s.get("mm_cache_hits_total") == 2
    assert s.get("num_preemptions_total") == 2
    assert s.histogram("iteration_tokens_total") == (8, 5 + 100 + 20000)
    assert s.get("iteration_tokens_total_bucket", le="1.0") == 5
    assert s.get("iteration_tokens_total_bucket", le="32.0") == 5
    assert s.get("iteration_tokens_total_bucket", le="64.0") == 7
    assert s.get("iteration_tokens_total_bucket", le="16384.0") == 7
    assert s.get("iteration_tokens_total_bucket", le="+Inf") == 8
    assert (s.get("num_requests_running"), s.get("num_requests_waiting"), s.get("kv_cache_usage_perc")) == (
        3,
        2,
        0.5,
    )
    assert s.get("num_requests_waiting_by_reason", reason="capacity") == 2
    assert s.get("num_requests_waiting_by_reason", reason="deferred") == 0
    info = {
        "block_size": "16",
        "cache_dtype": "bfloat16",
        "enable_prefix_caching": "True",
        "num_gpu_blocks": "100",
    }
    assert s.get("cache_config_info", **info) == 1


@pytest.mark.parametrize("names", MODES)
def test_names_and_labels_in_each_mode(names: NameMode) -> None:
    s = scrape(Metrics(MODEL, FakeEngine(), LoopLagMonitor(2.0), names=names))
    for family, kind in VLLM_FAMILIES.items():
        assert s.families[s.name(family)].type == kind, family
    own = {name for name in s.families if name.startswith("internvl:")}
    if names == "internvl":
        assert not any(name.startswith("vllm:") for name in s.families)
        assert own == {s.name(f) for f in VLLM_FAMILIES} | OWN_FAMILIES
        labels = {"model_name": MODEL}
    else:
        assert own == OWN_FAMILIES  # ours keep our prefix
        assert {n for n in s.families if n.startswith("vllm:")} == {
            s.name(f) for f in VLLM_FAMILIES | VLLM_DEPRECATED
        }
        assert s.sample_names >= VLLM_DASHBOARD_SERIES
        labels = {"model_name": MODEL, "engine": "0"}
    for family in VLLM_FAMILIES | (VLLM_DEPRECATED if names == "vllm" else {}):
        for sample in s.families[s.name(family)].samples:
            if family == "cache_config_info":
                assert ("engine" in sample.labels) == (names == "vllm")
                continue
            assert labels.items() <= sample.labels.items(), sample
            extra = set(sample.labels) - set(labels) - {"le"}
            assert extra <= {s.reason, "source", "reason"}, sample
    reasons = {
        x.labels[s.reason] for x in s.families[s.name("request_success")].samples if x.name.endswith("_total")
    }
    assert reasons == {"stop", "length", "abort", "error"}


def test_create_app_honours_the_metrics_names_setting() -> None:
    from server.app import create_app

    app = create_app(Settings(served_model_name=[MODEL], metrics_names="vllm"), FakeEngine())
    assert app.state.server.metrics.names == "vllm"


# -- over a real tiny engine ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model_runtime.loading.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("qwen2"), llm="qwen2")


class EngineView:
    """What Metrics reads of an EngineClient, over a test harness's engine."""

    def __init__(self, harness: Any) -> None:
        self._engine = harness.engine
        self.info = ModelInfo(
            max_model_len=harness.loaded.max_model_len,
            max_tiles_per_image=12,
            default_tiles_per_image=6,
            default_frames_per_video=8,
            template="tiny",
        )

    def stats(self) -> EngineStats:
        return self._engine.stats()


def serve(metrics: Metrics, outputs: list[RequestOutput]) -> None:
    """What server/chat.py does with one request's outputs."""
    tracker = metrics.track()
    for out in outputs:
        tracker.on_output(out)
    tracker.finished(outputs[-1], [d.finish_reason for o in outputs for d in o.deltas if d.finish_reason])


def submit(harness: Any, rid: str, chat_input: ChatInput, params: SamplingParams, salt: str = "") -> Any:
    request = harness.processor.process(rid, chat_input, params, cache_salt=salt)
    request.sink = harness.outputs.setdefault(rid, []).append
    harness.engine.add(request)
    return request


@pytest.mark.parametrize("names", MODES)
def test_engine_families_count_exactly(checkpoint: Path, names: NameMode) -> None:
    from tests.test_engine import CHATS, Harness

    harness = Harness(checkpoint)
    size = harness.engine.kv.block_size
    # A warm-up before the server begins: not counted (its salt keeps its cache entries apart).
    submit(harness, "warm", CHATS["two images"], SamplingParams(max_tokens=2, temperature=0.0), "warm")
    harness.run()
    metrics = Metrics("tiny", EngineView(harness), names=names)  # type: ignore[arg-type]

    def run(rid: str, chat_input: ChatInput, tokens: int) -> Any:
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        request = submit(harness, rid, chat_input, params)
        harness.run()
        serve(metrics, harness.outputs[rid])
        return request

    text, again = run("t1", CHATS["text"], 4), run("t2", CHATS["text"], 4)
    image, image_again = run("i1", CHATS["one image"], 3), run("i2", CHATS["one image"], 3)
    requests = [text, again, image, image_again]
    # A prompt that fills its blocks, sent again: all but its last block comes from the cache, and
    # that block, cached too, is computed again (its last token's logits are needed).
    assert text.prompt_len % size == 0
    assert (again.num_cached_tokens, again.num_recomputed_tokens) == (text.prompt_len - size, size)
    assert image_again.num_cached_tokens == (image.prompt_len - 1) // size * size
    s = scrape(metrics)
    assert s.get("prefix_cache_queries_total") == sum(r.prompt_len for r in requests)
    assert s.get("prefix_cache_hits_total") == sum(r.num_cached_tokens for r in requests)
    assert s.get("prompt_tokens_cached_total") == s.get("prefix_cache_hits_total")
    recomputed = sum(r.num_recomputed_tokens for r in requests)
    assert s.get("prompt_tokens_recomputed_total") == recomputed
    assert s.get("prompt_tokens_by_source_total", source="local_compute") == sum(
        r.prompt_len - r.num_cached_tokens for r in requests
    )
    local_hits = s.get("prompt_tokens_by_source_total", source="local_cache_hit")
    assert local_hits == s.get("prompt_tokens_cached_total") + recomputed
    # The image once encoded, once found; the warm-up's two images are not counted.
    assert (s.get("mm_cache_queries_total"), s.get("mm_cache_hits_total")) == (2, 1)
    assert s.get("num_preemptions_total") == 0
    # One request at a time: a step per generated token, the first computing the uncached prompt.
    generated = [len(r.seqs[0].output_ids) for r in requests]
    assert generated == [4, 4, 3, 3]
    computed = sum(
        r.prompt_len - r.num_cached_tokens + g - 1 for r, g in zip(requests, generated, strict=True)
    )
    assert s.histogram("iteration_tokens_total") == (sum(generated), computed)
    single = sum(
        r.prompt_len - r.num_cached_tokens == 1 for r in requests
    )  # a prompt of 16 k + 1, sent again
    assert s.get("iteration_tokens_total_bucket", le="1.0") == sum(g - 1 for g in generated) + single
    # Per request: lengths, parameters and the phase times the engine reported.
    finals = [harness.outputs[r.request_id][-1] for r in requests]
    stats = [f.stats for f in finals]
    assert all(st is not None and st.prefill_time >= 0 and st.decode_time >= 0 for st in stats)
    assert s.histogram("request_prompt_tokens") == (4, sum(r.prompt_len for r in requests))
    assert s.histogram("request_generation_tokens") == (4, sum(generated))
    assert s.histogram("request_max_num_generation_tokens") == (4, sum(generated))
    assert s.histogram("request_params_max_tokens") == (4, sum(generated))
    assert s.histogram("request_params_n") == (4, 4)
    assert s.histogram("request_prefill_time_seconds") == pytest.approx(
        (4, sum(st.prefill_time for st in stats))
    )
    assert s.histogram("request_decode_time_seconds") == pytest.approx(
        (4, sum(st.decode_time for st in stats))
    )
    queue = sum(harness.outputs[r.request_id][0].queue_time for r in requests)
    assert s.histogram("request_queue_time_seconds") == pytest.approx((4, queue))
    tpot = sum(st.decode_time / (g - 1) for st, g in zip(stats, generated, strict=True))
    assert s.histogram("request_time_per_output_token_seconds") == pytest.approx((4, tpot))
    assert s.get("request_success_total", **{s.reason: "length"}) == 4
    assert (
        s.get("cache_config_info", block_size=str(size), enable_prefix_caching="True", cache_dtype="float32")
        == 1
    )


def test_preemptions_are_counted_and_prompts_queried_once(checkpoint: Path) -> None:
    from tests.test_engine import CHATS, Harness

    probe = Harness(checkpoint)
    per_token = probe.pool_bytes_per_token
    # About 18 blocks: three 64-token prompts fit, their 100 tokens each cannot all grow together.
    tight = Harness(checkpoint, max_model_len=256, kv_cache_memory_gib=300 * per_token / 2**30)
    metrics = Metrics("tiny", EngineView(tight))  # type: ignore[arg-type]
    params = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
    requests = [submit(tight, f"p{i}", CHATS["text"], params, salt=str(i)) for i in range(3)]
    tight.run()
    for r in requests:
        serve(metrics, tight.outputs[r.request_id])
    s = scrape(metrics)
    preempted = sum(r.num_preemptions for r in requests)
    assert preempted > 0 and all(len(r.seqs[0].output_ids) == 100 for r in requests)
    assert s.get("num_preemptions_total") == preempted == tight.engine.scheduler.num_preemptions
    # Re-admitted after preemption, a request is not queried again.
    assert s.get("prefix_cache_queries_total") == 3 * requests[0].prompt_len
    assert s.get("request_success_total", finish_reason="length") == 3


# -- the dashboard and the alert rules --------------------------------------------------------------

# Grafana's variables, replaced by what a query could be sent with.
GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "${model_name:regex}": ".*",
}
METRIC_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*:[A-Za-z0-9_:]*")
STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: every name with a colon (ours and vLLM's all
    have one; label names, functions and keywords never do), string literals left out."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return set(METRIC_NAME.findall(STRING.sub('""', expr)))


def dashboard_exprs(node: Any) -> Iterator[str]:
    """Every PromQL expression in a dashboard: panel targets (rows and nested panels included) and
    query variables."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            elif key == "query" and isinstance(value, dict) and isinstance(value.get("query"), str):
                yield value["query"]
            elif key == "definition" and isinstance(value, str):
                yield value
            else:
                yield from dashboard_exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from dashboard_exprs(item)


def rule_exprs() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def test_there_is_a_dashboard_and_alert_rules() -> None:
    assert DASHBOARDS and ALERTS.is_file()
    for path in DASHBOARDS:
        assert len(list(dashboard_exprs(json.loads(path.read_text())))) >= 20, path
    assert len(rule_exprs()) >= 4


@pytest.mark.anyio
async def test_dashboard_and_rules_query_only_exported_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = FakeEngine()
    async with client(app_for(engine, "internvl", monkeypatch)) as c:
        await known_traffic(c, engine)
        exported = Scrape((await c.get("/metrics")).text, "internvl").sample_names
    queried: dict[str, set[str]] = {}
    for path in DASHBOARDS:
        for expr in dashboard_exprs(json.loads(path.read_text())):
            queried.setdefault(path.name, set()).update(metric_names(expr))
    for expr in rule_exprs():
        queried.setdefault(ALERTS.name, set()).update(metric_names(expr))
    for source, names in queried.items():
        assert names, source
        assert names <= exported, (
            f"{source} queries what the server does not export: {sorted(names - exported)}"
        )
    # What the dashboard is for: throughput, latency percentiles, queue, KV and prefix cache, images, errors.
    dashboard = set().union(*(queried[p.name] for p in DASHBOARDS))
    for needed in (
        "internvl:generation_tokens_total",
        "internvl:time_to_first_token_seconds_bucket",
        "internvl:inter_token_latency_seconds_bucket",
        "internvl:e2e_request_latency_seconds_bucket",
        "internvl:num_requests_waiting",
        "internvl:kv_cache_usage_perc",
        "internvl:prefix_cache_hits_total",
        "internvl:image_tokens_total",
        "internvl:request_errors_total",
    ):
        assert needed in dashboard, needed
