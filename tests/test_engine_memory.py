"""The paged engine on a tiny random InternVL: what the model says never changes with prefix caching
on or off, under preemption, with n > 1 sharing blocks, with images encoded in slices, or packed
with other sequences; token for token equal to transformers' generate()."""

from __future__ import annotations

import pytest

from model_runtime.request import ChatInput, ImageInput, Message
from model_runtime.sampling_params import SamplingParams
from tests.test_engine import CHATS, GREEDY, Harness, png, user


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from model_runtime.loading.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("qwen2"), llm="qwen2")


def outputs(
    harness: Harness, chats: dict[str, ChatInput], params: SamplingParams = GREEDY
) -> dict[str, list[int]]:
    requests = {name: harness.add(f"{name}-{id(harness)}", chat, params) for name, chat in chats.items()}
    harness.run()
    return {name: r.seqs[0].output_ids for name, r in requests.items()}


def references(harness: Harness, chats: dict[str, ChatInput], tokens: int = 12) -> dict[str, list[int]]:
    return {
        name: harness.reference(harness.request(f"ref-{name}", chat, GREEDY), tokens)
        for name, chat in chats.items()
    }


def test_prefix_caching_reuses_a_conversation_without_changing_the_answer(checkpoint) -> None:
    cached, plain = Harness(checkpoint), Harness(checkpoint, enable_prefix_caching=False)
    first = cached.add("turn-1", CHATS["one image"], GREEDY)
    cached.run()
    answer = cached.loaded.tokenizer.decode(first.seqs[0].output_ids, skip_special_tokens=True)
    turn2 = ChatInput(
        (
            *CHATS["one image"].messages,
            Message("assistant", (answer,)),
            Message("user", ("And the colours?",)),
        )
    )
    second = cached.add("turn-2", turn2, GREEDY)
    cached.run()
    assert second.num_cached_tokens >= first.prompt_len - cached.engine.kv.block_size
    assert cached.outputs["turn-2"][-1].cached_tokens == second.num_cached_tokens
    assert second.seqs[0].output_ids == cached.reference(cached.request("ref", turn2, GREEDY), 12)
    assert outputs(plain, {"t2": turn2})["t2"] == second.seqs[0].output_ids
    assert plain.engine.kv.hit_tokens == 0
    assert cached.engine.stats().prefix_cache_hits == cached.engine.kv.hit_tokens > 0


def test_different_images_with_the_same_text_never_share_cached_blocks(checkpoint) -> None:
    harness = Harness(checkpoint)
    chats = {
        f"image-{seed}": ChatInput((user(ImageInput(png(seed), max_tiles=2), "Describe the image."),))
        for seed in (21, 22)
    }
    first = outputs(harness, {"image-21": chats["image-21"]})
    second = outputs(harness, {"image-22": chats["image-22"]})
    expected = references(harness, chats)
    assert first["image-21"] == expected["image-21"] and second["image-22"] == expected["image-22"]


def test_preemption_recomputes_without_changing_the_answers(checkpoint) -> None:
    roomy = Harness(checkpoint)
    per_token = roomy.pool_bytes_per_token
    # Room for about 1,100 tokens: four 300-token image prompts each generating 60 tokens cannot all grow.
    tight = Harness(checkpoint, max_model_len=1024, kv_cache_memory_gib=1100 * per_token / 2**30)
    chats = {
        f"c{i}": ChatInput((user(ImageInput(png(30 + i), max_tiles=1), f"Describe image {i}."),))
        for i in range(4)
    }
    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    got = outputs(tight, chats, params)
    assert tight.engine.scheduler.num_preemptions > 0
    want = outputs(roomy, chats, params)
    assert got == want
    assert tight.engine.stats().cache_used_blocks == 0


def test_n_choices_share_the_prompts_blocks(checkpoint) -> None:
    harness = Harness(checkpoint, enable_prefix_caching=False)
    request = harness.add("n3", CHATS["one image"], SamplingParams(n=3, max_tokens=12, temperature=0.0))
    while not all(seq.output_ids for seq in request.seqs):  # the prompt, then every choice's first token
        harness.engine.step()
    tables = [seq.block_table for seq in request.seqs]
    full = request.prompt_len // harness.engine.kv.block_size
    assert tables[0][:full] == tables[1][:full] == tables[2][:full]
    assert harness.engine.stats().cache_used_blocks == len(tables[0])  # one copy, not three
    harness.run()
    reference = harness.reference(harness.request("ref", CHATS["one image"], GREEDY), 12)
    assert [seq.output_ids for seq in request.seqs] == [reference] * 3


def test_seeded_choices_diverge_reproducibly(checkpoint) -> None:
    params = SamplingParams(n=2, max_tokens=10, temperature=1.0, seed=7)
    runs = []
    for _ in range(2):
        harness = Harness(checkpoint)
        request = harness.add("seeded", CHATS["text"], params)
        harness.run()
        runs.append([seq.output_ids for seq in request.seqs])
    assert runs[0] == runs[1] and runs[0][0] != runs[0][1]


def test_images_encoded_in_slices_while_a_stream_decodes_give_the_same_answer(checkpoint) -> None:
    harness = Harness(checkpoint, step_time_target_ms=1)  # not even one tile fits a step
    vision = harness.engine.runner.vision
    sliced = []
    encode = vision.encode
    vision.encode = lambda tasks: (sliced.extend(t for t in tasks if t.stages is not None), encode(tasks))
    stream = harness.add(
        "stream", CHATS["text"], SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    )
    harness.engine.step()
    image = harness.add("image", CHATS["two images"], GREEDY)
    while not image.finished:
        harness.engine.step()
    assert sliced and not stream.finished
    assert image.seqs[0].output_ids == harness.reference(
        harness.request("ref", CHATS["two images"], GREEDY), 12
    )


def test_phi3_long_and_short_prompts_packed_together_keep_their_own_rope(tmp_path) -> None:
    """LongRoPE picks long factors for a prompt over 4,096 tokens and short ones for the other,
    as Phi-3's code does when each runs alone, though both share a step's forward."""
    from model_runtime.loading.tiny import write_tiny_checkpoint

    harness = Harness(write_tiny_checkpoint(tmp_path / "phi3", llm="phi3"), max_model_len=8192)
    long_text = "The quick brown fox jumps over the lazy dog. " * 115  # ~4,250 tokens
    chats = {"long": ChatInput((user(long_text),)), "short": CHATS["text"]}
    got = outputs(harness, chats)
    long_request = harness.request("len", chats["long"], GREEDY)
    assert long_request.prompt_len > 4096
    assert got == references(harness, chats)
    assert harness.engine.runner.rotary.cache_root(
        long_request.prompt_len
    ) != harness.engine.runner.rotary.cache_root(10)
