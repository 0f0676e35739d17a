"""The engine on a tiny random InternVL: exact greedy parity with transformers, batching, limits."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from model_runtime.config import EngineConfig
from model_runtime.engine.decode_window import WINDOW_TOKENS, DecodeWindow
from model_runtime.engine.engine import Engine
from model_runtime.engine.sequence import Request
from model_runtime.errors import PromptTooLongError, QueueFullError, RequestFailedError
from model_runtime.inputs.processor import Processor
from model_runtime.loading.checkpoint import load_checkpoint
from model_runtime.request import ChatInput, ImageInput, Message, RequestOutput, VideoInput
from model_runtime.sampling_params import SamplingParams


def png(seed: int, size: tuple[int, int] = (300, 200)) -> bytes:
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


def mp4(frames: int = 12) -> bytes:
    av = pytest.importorskip("av")
    out = io.BytesIO()
    with av.open(out, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=6)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            array = np.full((48, 64, 3), (i * 20) % 255, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


class Harness:
    """An engine plus the processor, stepping synchronously (no worker thread)."""

    def __init__(self, path, **overrides) -> None:
        self.config = EngineConfig(
            model=str(path), max_model_len=overrides.pop("max_model_len", 4096), **overrides
        )
        self.loaded = load_checkpoint(self.config)
        self.engine = Engine(self.loaded, self.config)
        self.processor = Processor(self.loaded, self.config, self.engine.vision_cache)
        # References are built from pixels, so their processor never takes features from the cache.
        self.uncached = Processor(self.loaded, self.config)
        self.outputs: dict[str, list[RequestOutput]] = {}

    @property
    def pool_bytes_per_token(self) -> int:
        pool = self.engine.pool
        return pool.total_bytes // (pool.num_blocks * pool.block_size)

    def request(self, rid: str, chat: ChatInput, params: SamplingParams) -> Request:
        """A prepared request with its pixel values (for references), not submitted."""
        return self.uncached.process(rid, chat, params)

    def add(self, rid: str, chat: ChatInput, params: SamplingParams) -> Request:
        request = self.processor.process(rid, chat, params)
        request.sink = self.outputs.setdefault(rid, []).append
        self.engine.add(request)
        return request

    def run(self, max_steps: int = 10_000) -> None:
        for _ in range(max_steps):
            if not self.engine.scheduler.has_work:
                return
            self.engine.step()
        raise AssertionError("engine did not drain")

    def text(self, rid: str, index: int = 0) -> str:
        return "".join(d.text for o in self.outputs[rid] for d in o.deltas if d.index == index)

    def reference(self, request: Request, max_new_tokens: int) -> list[int]:
        """transformers' own generate() on the native class, as the model card's chat() runs it."""
        model = self.loaded.model
        device, dtype = self.loaded.device, self.loaded.dtype
        ids = torch.tensor([request.prompt_ids], device=device)
        kwargs = {}
        if request.images:
            pixels = torch.cat([image.pixel_values for image in request.images])
            kwargs["pixel_values"] = pixels.to(device, dtype)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),  # else a BOS equal to pad_token_id would be masked
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=list(self.loaded.stop_token_ids),
                pad_token_id=0,
                **kwargs,
            )
        return out[0, ids.shape[1] :].tolist()


GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


def user(*parts) -> Message:
    return Message("user", tuple(parts))


CHATS = {
    "text": ChatInput((user("Hello, who are you?"),)),
    "one image": ChatInput((user(ImageInput(png(1), max_tiles=4), "Describe the image."),)),
    "two images": ChatInput(
        (user(ImageInput(png(2), max_tiles=2), ImageInput(png(3, (120, 400)), max_tiles=3), "Compare them."),)
    ),
    "multi-turn": ChatInput(
        (
            Message("system", ("You are terse.",)),
            user(ImageInput(png(4), max_tiles=2), "What is this?"),
            Message("assistant", ("A picture of noise.",)),
            user("And the colors?"),
        )
    ),
}


@pytest.fixture(scope="module", params=["qwen2", "internlm2"])
def harness(request, tmp_path_factory):
    from model_runtime.loading.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path_factory.mktemp(request.param), llm=request.param, layout="original")
    return Harness(path)


@pytest.mark.parametrize("name", list(CHATS))
def test_greedy_matches_transformers_generate(harness: Harness, name: str) -> None:
    request = harness.add(f"one-{name}", CHATS[name], GREEDY)
    reference = harness.reference(harness.request("ref", CHATS[name], GREEDY), 12)
    harness.run()
    assert request.seqs[0].output_ids == reference


def test_video_matches_transformers_generate(harness: Harness) -> None:
    chat = ChatInput((user(VideoInput(mp4(), num_frames=4), "What happens?"),))
    request = harness.add("video", chat, GREEDY)
    text = harness.loaded.tokenizer.decode(request.prompt_ids)
    # (InternLM2's tokenizer decodes with a space before special tokens, as the original does.)
    assert len(request.images) == 4 and ("Frame4: <img>" in text or "Frame4:  <img>" in text)
    reference = harness.reference(harness.request("ref-video", chat, GREEDY), 12)
    harness.run()
    assert request.seqs[0].output_ids == reference


def test_batched_equals_one_at_a_time_with_joins(harness: Harness) -> None:
    chats = list(CHATS.values()) * 2
    alone = []
    for i, chat in enumerate(chats):
        request = harness.add(f"alone-{i}", chat, GREEDY)
        harness.run()
        alone.append(request.seqs[0].output_ids)
    batched = [harness.add(f"batch-{i}", chat, GREEDY) for i, chat in enumerate(chats[:4])]
    for _ in range(3):
        harness.engine.step()
    batched += [harness.add(f"batch-{i + 4}", chat, GREEDY) for i, chat in enumerate(chats[4:])]
    harness.run()
    assert [r.seqs[0].output_ids for r in batched] == alone
    assert harness.engine.stats().cache_used_blocks == 0


def test_decode_window_gathered_and_in_place_decodes_give_the_same_tokens(harness: Harness) -> None:
    """On the CPU a short decode with a lane is attended in the decode window (decode_window.py);
    one without a lane whose context is in several runs of the pool (here: a cached shared
    prefix, then its own blocks) is gathered and batched, and a long one read in place
    (attention.py). All answer as transformers' generate() does."""
    runner = harness.engine.runner
    if runner.device.type != "cpu":
        pytest.skip("the window and the in-place / gathered split are the CPU's")
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    short = [ChatInput((user(f"Hello, who are you? {word}"),)) for word in ("red", "green", "blue")]
    long = [ChatInput((user("Describe the sea in detail. " * 40 + word),)) for word in ("red", "green")]
    references = [
        harness.reference(harness.request(f"ref-{i}", c, params), 16) for i, c in enumerate(short + long)
    ]
    harness.add("warm", short[0], params)  # puts the shared prefix in the prefix cache
    harness.run()
    packs = []
    pack, window = runner._pack, runner.window
    runner._pack = lambda chunks: packs.append(pack(chunks)) or packs[-1]
    pool = harness.engine.pool
    runner.window = DecodeWindow(pool.shape, 2, WINDOW_TOKENS, pool.k[0].dtype)  # fewer lanes than decodes
    try:
        requests = [harness.add(f"mix-{i}", c, params) for i, c in enumerate(short + long)]
        harness.run()
    finally:
        runner._pack, runner.window = pack, window
    assert [r.seqs[0].output_ids for r in requests] == references
    assert any(batch.window is not None and len(batch.window.lanes) == 2 for _, _, batch, _ in packs)
    assert any(batch.groups for _, _, batch, _ in packs)  # the short decode without a lane: gathered
    assert any(span.decode and len(span.runs) > 1 for _, _, batch, _ in packs for span in batch.spans)


def test_streamed_text_equals_decode(harness: Harness) -> None:
    request = harness.add(
        "stream", CHATS["text"], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    )
    harness.run()
    ids = request.seqs[0].output_ids
    assert harness.text("stream") == harness.loaded.tokenizer.decode(ids, skip_special_tokens=True)
    final = harness.outputs["stream"][-1]
    assert final.finished and final.deltas[-1].finish_reason == "length"
    assert final.completion_tokens == 20 and final.prompt_tokens == request.prompt_len


def test_stop_string_is_never_emitted(harness: Harness) -> None:
    probe = harness.add(
        "probe", CHATS["text"], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    )
    harness.run()
    full = harness.text("probe")
    stop = full[5:8]
    assert len(stop) == 3
    harness.add(
        "stopped",
        CHATS["text"],
        SamplingParams(max_tokens=20, temperature=0.0, stop=(stop,), ignore_eos=True),
    )
    harness.run()
    assert harness.text("stopped") == full[: full.index(stop)]
    assert harness.outputs["stopped"][-1].deltas[-1].finish_reason == "stop"
    del probe


def test_seeded_sampling_is_reproducible_inside_a_batch(harness: Harness) -> None:
    seeded = SamplingParams(max_tokens=10, temperature=1.0, seed=1234, ignore_eos=True)
    alone = harness.add("seed-alone", CHATS["text"], seeded)
    harness.run()
    crowd = [
        harness.add(f"noise-{i}", CHATS["one image"], SamplingParams(max_tokens=10, ignore_eos=True))
        for i in range(3)
    ]
    together = harness.add("seed-batch", CHATS["text"], seeded)
    harness.run()
    assert together.seqs[0].output_ids == alone.seqs[0].output_ids
    assert all(len(r.seqs[0].output_ids) == 10 for r in crowd)


def test_n_shares_one_prefill(harness: Harness) -> None:
    request = harness.add(
        "n3", CHATS["one image"], SamplingParams(n=3, max_tokens=8, temperature=0.0, ignore_eos=True)
    )
    harness.run()
    outs = [seq.output_ids for seq in request.seqs]
    assert outs[0] == outs[1] == outs[2] and len(outs[0]) == 8
    reasons = [d.finish_reason for o in harness.outputs["n3"] for d in o.deltas if d.finish_reason]
    assert sorted(reasons) == ["length"] * 3


def test_abort_frees_blocks(harness: Harness) -> None:
    requests = [
        harness.add(f"ab-{i}", CHATS["text"], SamplingParams(max_tokens=50, ignore_eos=True))
        for i in range(4)
    ]
    for _ in range(3):
        harness.engine.step()
    stats = harness.engine.stats()
    assert stats.num_running == 4 and stats.cache_used_blocks >= 4
    for request in requests:
        harness.engine.abort(request.request_id)
    stats = harness.engine.stats()
    assert stats.cache_used_blocks == 0 and stats.cache_usage == 0.0 and stats.num_running == 0
    assert not harness.engine.scheduler.has_work


def test_over_length_and_queue_full(tmp_path) -> None:
    from model_runtime.loading.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path / "ckpt")
    small = Harness(path, max_model_len=64, max_num_seqs=2, max_waiting=1)
    with pytest.raises(PromptTooLongError) as info:
        small.add("long", CHATS["one image"], GREEDY)
    assert "64" in info.value.message and "max_model_len" in info.value.message
    with pytest.raises(PromptTooLongError):
        small.add("len", CHATS["text"], SamplingParams(max_tokens=60))
    small.add("q1", ChatInput((user("hi"),)), SamplingParams(max_tokens=4))
    with pytest.raises(QueueFullError):
        small.add("q2", ChatInput((user("hi"),)), SamplingParams(max_tokens=4))


def test_a_failing_request_leaves_the_others_running(harness: Harness) -> None:
    def explode(request: Request) -> None:
        if request.request_id == "bad":
            raise RuntimeError("injected")

    harness.engine.fault_hook = explode
    try:
        good = harness.add("good", CHATS["text"], GREEDY)
        harness.add("bad", CHATS["one image"], GREEDY)
        harness.run()
    finally:
        harness.engine.fault_hook = None
    assert len(good.seqs[0].output_ids) > 0 and good.seqs[0].finish_reason in ("stop", "length")
    last = harness.outputs["bad"][-1]
    assert (
        last.finished and isinstance(last.error, RequestFailedError) and "injected" not in last.error.message
    )
    assert harness.engine.stats().cache_used_blocks == 0


def test_a_forward_failing_between_layers_leaves_decodes_exact(harness: Harness) -> None:
    """A packed forward that fails in a middle layer, after the first layers wrote the step's keys
    and values (and, on the CPU, copied them into the decode window), is rerun request by request;
    the decodes still answer as generate() does."""
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    chats = [ChatInput((user(f"Count the {word} birds."),)) for word in ("red", "blue")]
    references = [harness.reference(harness.request(f"ref-{i}", c, params), 12) for i, c in enumerate(chats)]
    requests = [harness.add(f"fail-mid-{i}", c, params) for i, c in enumerate(chats)]
    for _ in range(4):
        harness.engine.step()
    layers = harness.engine.runner.lm.layers
    layer = layers[len(layers) // 2]

    def broken(*args, **kwargs):
        del layer.forward  # fails once
        raise RuntimeError("injected")

    layer.forward = broken
    harness.engine.step()
    assert "forward" not in vars(layer)
    window, pool = harness.engine.runner.window, harness.engine.pool
    if window is not None:  # every lane holds what the pool holds, in every layer
        assert window._owners
        for seq, lane, held in window._owners.values():
            size = pool.block_size
            rows = [seq.block_table[p // size] * size + p % size for p in range(held)]
            for index in range(len(layers)):
                k_flat, _ = pool.flat(index)
                assert torch.equal(window.k[index][lane, :, :held], k_flat[rows].transpose(0, 1))
    harness.run()
    assert [r.seqs[0].output_ids for r in requests] == references


def test_chunked_prefill_matches(tmp_path) -> None:
    from model_runtime.loading.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path / "ckpt")
    chunked = Harness(path, max_num_batched_tokens=100, max_num_seqs=4)
    request = chunked.add("long", CHATS["one image"], GREEDY)
    other = chunked.add("short", CHATS["text"], GREEDY)
    chunked.run()
    assert request.prompt_len > 250  # three chunks of at most 100 tokens
    assert request.seqs[0].output_ids == chunked.reference(
        chunked.request("r", CHATS["one image"], GREEDY), 12
    )
    assert other.seqs[0].output_ids == chunked.reference(chunked.request("r2", CHATS["text"], GREEDY), 12)


def test_prompt_logprobs_equal_one_plain_forward(tmp_path) -> None:
    """Computed chunk by chunk in packed steps beside another request, never from the prefix cache
    (the same prompt was cached just before), and equal to log_softmax of one transformers forward."""
    from model_runtime.loading.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path / "ckpt")
    harness = Harness(path, max_num_batched_tokens=40, max_num_seqs=4)
    text = "The quick brown fox jumps over the lazy dog. " * 6
    plain = SamplingParams(max_tokens=2, temperature=0.0)
    harness.add("warm", ChatInput((), prompt=text), plain)
    harness.run()
    params = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=3)
    request = harness.add("p", ChatInput((), prompt=text), params)
    harness.add("other", CHATS["text"], GREEDY)
    harness.run()
    assert request.prompt_len > 80 and request.num_cached_tokens == 0  # three chunks, none cached
    (reported,) = [o.prompt_logprobs for o in harness.outputs["p"] if o.prompt_logprobs is not None]
    assert reported.token_ids == request.prompt_ids
    ids = torch.tensor([request.prompt_ids])
    with torch.inference_mode():
        expected = harness.loaded.model(input_ids=ids).logits[0].float().log_softmax(-1)
    vocabulary = harness.engine.vocabulary
    for position in range(1, len(reported)):
        token_id = reported.token_ids[position]
        assert reported.logprobs[position] == pytest.approx(expected[position - 1, token_id].item(), abs=1e-4)
        assert reported.tokens[position] == vocabulary.token_text(token_id)
        top = expected[position - 1].topk(3)
        assert reported.top_ids[(position - 1) * 3 : position * 3] == top.indices.tolist()
        assert [lp for _, lp in reported.top(position)] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert reported.logprobs[0] == 0.0 and reported.top(0) == []
    assert len(reported.top_tokens) == 3 * (len(reported) - 1)


def test_a_one_token_prompt_is_scored_too(harness: Harness) -> None:
    """Nothing precedes its only token: one entry, logprob 0.0, no alternatives (the engine once
    died here, finding no scored chunk to report)."""
    params = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=1)
    request = harness.add("one", ChatInput((), prompt=(7,)), params)
    harness.run()
    (reported,) = [o.prompt_logprobs for o in harness.outputs["one"] if o.prompt_logprobs is not None]
    assert reported.token_ids == [7] == request.prompt_ids
    assert reported.logprobs == [0.0] and reported.top(0) == [] and reported.top_tokens == []
    assert len(request.seqs[0].output_ids) == 2


@pytest.mark.parametrize("llm", ["qwen3", "llama", "phi3", "yi"])
def test_other_llm_kinds_match_transformers_generate(llm: str, tmp_path) -> None:
    from model_runtime.loading.tiny import write_tiny_checkpoint

    other = Harness(write_tiny_checkpoint(tmp_path / llm, llm=llm))
    requests = [other.add(f"{llm}-{name}", CHATS[name], GREEDY) for name in ("text", "one image")]
    other.run()
    for request, name in zip(requests, ("text", "one image"), strict=True):
        assert request.seqs[0].output_ids == other.reference(other.request("r", CHATS[name], GREEDY), 12)


def test_a_resent_image_skips_decoding_and_encoding(tmp_path) -> None:
    from model_runtime.loading.tiny import write_tiny_checkpoint

    cached = Harness(write_tiny_checkpoint(tmp_path / "ckpt"))
    first = cached.add("first", CHATS["multi-turn"], GREEDY)
    cached.run()
    hits = cached.engine.vision_cache.hits
    again = cached.add("again", CHATS["multi-turn"], GREEDY)  # a chat re-sends its images every turn
    assert all(image.pixel_values is None and image.features is not None for image in again.images)
    assert cached.engine.vision_cache.hits == hits + len(again.images)
    cached.run()
    assert again.seqs[0].output_ids == first.seqs[0].output_ids
    assert again.image_token_count == first.image_token_count


def test_serves_a_quantized_model(tmp_path) -> None:
    pytest.importorskip("bitsandbytes")
    from model_runtime.loading.tiny import write_tiny_checkpoint

    quant = Harness(write_tiny_checkpoint(tmp_path / "q"), quantization="4bit")
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    requests = [quant.add(f"q{i}", chat, params) for i, chat in enumerate(CHATS.values())]
    quant.run()
    assert all(len(r.seqs[0].output_ids) == 8 for r in requests)
    assert quant.engine.stats().cache_used_blocks == 0


def test_max_model_len_is_cut_to_what_the_kv_cache_holds(tiny_checkpoints, caplog) -> None:
    path = tiny_checkpoints[("qwen2", "original")]  # the model allows 32768 tokens
    probe = Harness(path, max_num_seqs=1)
    per_token = probe.pool_bytes_per_token
    budget = 3000 * per_token / 2**30  # room for 3000 tokens
    with caplog.at_level("INFO", logger="model_runtime.engine.engine"):
        small = Harness(path, max_model_len=None, kv_cache_memory_gib=budget)
    holds = small.engine.kv.capacity_tokens
    assert small.engine.scheduler.max_model_len == small.loaded.max_model_len < holds <= 3000
    assert f"max_model_len {small.loaded.max_model_len} (the model allows 32768" in caplog.text
    with pytest.raises(ValueError, match="does not fit in the KV cache"):
        Harness(path, max_model_len=4096, kv_cache_memory_gib=budget)
