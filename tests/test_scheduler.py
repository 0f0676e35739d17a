"""The scheduler without torch: budgets, admission by blocks, preemption, forks, images, prefix reuse.

A fake engine stands in for the runner: it writes a label (position, token, image key) into a fake
block pool for every token a chunk computes, and checks that every chunk's context (its sequence's
blocks, positions 0..end) holds exactly that sequence's labels. A wrong block table, a missed
copy-on-write, a shared block that diverged or a prefix reused across different images shows up as
a sequence reading someone else's tokens.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from model_runtime.engine.block_manager import KVCacheManager
from model_runtime.engine.scheduler import Scheduler, StepCostModel, StepPlan, attention_pairs
from model_runtime.engine.sequence import ImageSlot, Request, Sequence, Status
from model_runtime.errors import InvalidRequestError, PromptTooLongError, QueueFullError
from model_runtime.sampling_params import SamplingParams

_ids = itertools.count()
VOCAB = 50
IMAGE_TOKEN = 99


def make_request(
    prompt: list[int] | int,
    *,
    n: int = 1,
    max_tokens: int = 8,
    images: list[tuple[str, int, int, int]] = (),  # (key, start, tiles, tokens per tile)
) -> Request:
    ids = list(range(prompt)) if isinstance(prompt, int) else list(prompt)
    slots = []
    for key, start, tiles, per_tile in images:
        ids[start : start + tiles * per_tile] = [IMAGE_TOKEN] * (tiles * per_tile)
        slots.append(
            ImageSlot(key=key, num_tiles=tiles, pixel_values=None, start=start, num_tokens=tiles * per_tile)
        )
    params = SamplingParams(n=n, max_tokens=max_tokens, temperature=0.0)
    return Request(f"req-{next(_ids)}", ids, params, max_tokens=max_tokens, images=slots)


class FixedCost(StepCostModel):
    """A cost model with known costs: per step `base`, per token `token_s`, per attention pair
    `pair_s`, per scored prompt token `score_s`, per tile `tile_s`."""

    def __init__(
        self, target_s: float | None, *, max_tokens: int = 10_000, max_tiles: int = 100, **costs: float
    ):
        super().__init__(target_s, max_tokens=max_tokens, max_tiles=max_tiles, min_tokens=4)
        self.costs = (
            costs.get("base", 0.0),
            costs.get("token_s", 0.001),
            costs.get("pair_s", 0.0),
            costs.get("score_s", 0.0),
        )
        self.tile = costs.get("tile_s", 0.01)

    def _weights(self) -> tuple[float, float, float, float]:
        return self.costs

    @property
    def tile_seconds(self) -> float:
        return self.tile


def make_scheduler(
    *,
    blocks: int = 65,
    block_size: int = 4,
    max_num_seqs: int = 16,
    max_num_batched_tokens: int = 64,
    max_model_len: int = 128,
    max_waiting: int = 64,
    target_s: float = 1e9,
    prefix_caching: bool = True,
    reserve: int = 1,
) -> Scheduler:
    kv = KVCacheManager(blocks, block_size, prefix_caching=prefix_caching)
    return Scheduler(
        kv,
        FixedCost(target_s),
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
        max_waiting=max_waiting,
        reserve_blocks=reserve,
    )


def label(seq: Sequence, position: int) -> tuple:
    request = seq.request
    image = next((im.key for im in request.images if im.start <= position < im.end), None)
    return (position, seq.tokens(position, position + 1)[0], image)


class FakeEngine:
    """Drives a Scheduler as the engine does, with labels standing in for keys and values."""

    def __init__(self, sched: Scheduler, sample: Callable[[Sequence], int] | None = None) -> None:
        self.sched = sched
        size = sched.kv.block_size
        self.cache: list[list[tuple | None]] = [[None] * size for _ in range(sched.kv.pool.num_blocks)]
        self.sample = sample or (lambda seq: (7 * seq.index + 3 * seq.num_tokens) % VOCAB)
        self.finished: list[Request] = []
        self.peak_running = 0

    def step(self, stop: Callable[[Sequence], bool] = lambda seq: False) -> StepPlan:
        sched, size = self.sched, self.sched.kv.block_size
        plan = sched.schedule()
        for src, dst in plan.copies:
            self.cache[dst] = list(self.cache[src])
        for task in plan.vision:  # as engine/vision.py does
            image = task.image
            assert task.start == image.tiles_ready, "tiles are encoded in order"
            if task.stages is None:
                assert image.stage == 0, "a whole tile never starts over a tile in progress"
                image.tiles_ready = task.end
                continue
            first, last = task.stages
            assert task.end == task.start + 1 and first == image.stage < last <= self.sched.vision_stages
            image.stage = 0 if last == self.sched.vision_stages else last
            image.tiles_ready += last == self.sched.vision_stages
        for chunk in plan.chunks:
            seq = chunk.seq
            assert (
                seq.status is Status.RUNNING and chunk.start == seq.num_computed < chunk.end <= seq.num_tokens
            )
            for image in seq.request.images:  # image tokens are computed only once encoded
                overlap_end = min(chunk.end, image.end)
                assert overlap_end <= image.ready_end or chunk.end <= image.start or chunk.start >= image.end
            for p in range(chunk.start, chunk.end):
                self.cache[seq.block_table[p // size]][p % size] = label(seq, p)
        for chunk in plan.chunks:  # after every write of the step, as attention reads them
            seq = chunk.seq
            context = [self.cache[seq.block_table[p // size]][p % size] for p in range(chunk.end)]
            assert context == [label(seq, p) for p in range(chunk.end)], (
                f"{seq.request.request_id} reads wrong KV"
            )
        sched.computed(plan.chunks)
        for chunk in plan.chunks:
            if not chunk.samples or chunk.seq.finished:
                continue
            seq, request = chunk.seq, chunk.seq.request
            if request.n > 1 and seq.index == 0 and not seq.output_ids:
                sched.fork(request)
                choices = [s for s in request.seqs if not s.finished]
            else:
                choices = [seq]
            for choice in choices:
                choice.output_ids.append(self.sample(choice))
                if len(choice.output_ids) >= request.max_tokens or stop(choice):
                    sched.finish(choice, "length")
            if request.finished:
                self.finished.append(request)
        self.peak_running = max(self.peak_running, sched.num_running)
        self.check()
        return plan

    def check(self) -> None:
        """Block references equal table entries; nothing leaks, nothing is shared that diverged."""
        kv = self.sched.kv
        holders = [0] * kv.pool.num_blocks
        for request in self.sched.running:
            for seq in request.seqs:
                if seq.status is Status.RUNNING:
                    for block in seq.block_table:
                        holders[block] += 1
                    assert len(seq.block_table) * kv.block_size >= seq.num_computed
        for request in self.sched.waiting:
            assert all(not s.block_table for s in request.seqs)
        assert holders == kv.pool.refs, "block references do not match the tables"

    def run(self, max_steps: int = 5000, **kwargs) -> None:
        for _ in range(max_steps):
            if not self.sched.has_work:
                return
            self.step(**kwargs)
        raise AssertionError("the scheduler did not drain")


# -- admission and budgets --------------------------------------------------------------------------


def test_decodes_run_every_step_while_a_long_prompt_prefills_in_chunks() -> None:
    sched = make_scheduler(max_num_batched_tokens=16, max_model_len=512, blocks=200)
    engine = FakeEngine(sched)
    short = make_request(6, max_tokens=40)
    sched.add(short)
    engine.step()
    long = make_request(100, max_tokens=4)
    sched.add(long)
    seen = []
    while not long.seqs[0].output_ids:
        plan = engine.step()
        decoding = [c for c in plan.chunks if c.seq is short.seqs[0]]
        assert len(decoding) == 1 and decoding[0].end - decoding[0].start == 1
        assert plan.num_tokens <= 16
        seen.append(plan.num_tokens)
    assert len(seen) >= 100 // 15


def test_sixteen_short_chats_share_a_small_cache() -> None:
    """The issue's case: a cache worth 2,048 tokens, 16 chats of ~100 prompt + 96 output tokens."""
    sched = make_scheduler(
        blocks=2048 // 16 + 1, block_size=16, max_num_batched_tokens=2048, max_model_len=2048
    )
    engine = FakeEngine(sched)
    for i in range(16):
        sched.add(make_request([i % VOCAB] + list(range(99)), max_tokens=96))
    engine.run()
    assert len(engine.finished) == 16 and engine.peak_running >= 12
    assert sched.kv.pool.num_used == 0


def test_admission_waits_for_blocks_first_come_first_served() -> None:
    sched = make_scheduler(blocks=11, block_size=4, max_model_len=40, reserve=0)  # 10 usable blocks
    engine = FakeEngine(sched)
    big = make_request(30, max_tokens=2)  # 8 blocks
    sched.add(big)
    engine.step()
    second = make_request([40 + i for i in range(12)], max_tokens=2)  # 3 blocks: must wait for the first
    third = make_request([60, 61, 62, 63], max_tokens=2)  # would fit, but first come first served
    sched.add(second)
    sched.add(third)
    engine.step()
    assert sched.waiting[0] is second and third in sched.waiting
    engine.run()
    assert [r.request_id for r in engine.finished] == [big.request_id, second.request_id, third.request_id]


def test_step_time_budget_limits_prefill_and_tiles() -> None:
    sched = make_scheduler(max_num_batched_tokens=1000, max_model_len=512, blocks=400, target_s=0.1)
    sched.cost = FixedCost(0.1, base=0.01, token_s=0.001, tile_s=0.02)
    engine = FakeEngine(sched)
    alone = make_request(150, max_tokens=50)
    sched.add(alone)
    plan = engine.step()
    assert plan.num_tokens == 100  # nothing decoding: the (fixed) target still bounds the step
    plan = engine.step()
    assert plan.num_tokens == 50
    sched.add(make_request(300, max_tokens=4, images=[("img", 10, 10, 4)]))
    plan = engine.step()
    # 0.1 s - (0.01 + 1 decode * 0.001): 4 tiles (0.08 s), then what is left buys prefill tokens.
    assert plan.num_tiles == 4
    prefill = plan.num_tokens - 1
    assert 4 <= prefill <= 10
    assert sched.cost.lm_seconds(plan.num_tokens, 0) + plan.num_tiles * 0.02 <= 0.1 + 4 * 0.001


def test_idle_steps_are_held_near_the_idle_target() -> None:
    sched = make_scheduler(max_num_batched_tokens=1000, max_model_len=1024, blocks=400)
    sched.cost = FixedCost(None, token_s=0.001)
    sched.cost.idle_s = 0.2
    engine = FakeEngine(sched)
    sched.add(make_request(500, max_tokens=4))
    assert [engine.step().num_tokens for _ in range(3)] == [200, 200, 100]


def test_a_request_waiting_behind_a_long_prompt_joins_the_next_step() -> None:
    sched = make_scheduler(max_num_batched_tokens=1000, max_model_len=1024, blocks=400, prefix_caching=False)
    sched.cost = FixedCost(None, token_s=0.001)
    sched.cost.idle_s = 0.2
    engine = FakeEngine(sched)
    long = make_request(900, max_tokens=4)
    sched.add(long)
    engine.step()
    short = make_request(10, max_tokens=4)
    sched.add(short)
    plan = engine.step()
    # The short prompt's 10 tokens were held out of the long prompt's share of the step.
    assert {c.seq.request.request_id: c.end - c.start for c in plan.chunks} == {
        long.request_id: 190,
        short.request_id: 10,
    }
    # The short one decodes now, so the step's target is the 0.1 s floor; a long newcomer is held
    # half of what is left after the decode.
    other = make_request(600, max_tokens=4)
    sched.add(other)
    plan = engine.step()
    spent = {c.seq.request.request_id: c.end - c.start for c in plan.chunks}
    assert spent[short.request_id] == 1
    assert spent[long.request_id] in (49, 50) and spent[other.request_id] in (49, 50)


def test_scoring_a_prompt_counts_in_the_step_budget() -> None:
    cost = FixedCost(0.1, token_s=0.001, score_s=0.004)
    assert cost.affordable_tokens(0.05, 0) == 50
    assert cost.affordable_tokens(0.05, 0, scored=True) == 10
    assert cost.chunk_seconds(0, 10, scored=True) == pytest.approx(0.05)


def test_without_a_fixed_target_a_step_may_take_a_multiple_of_its_decodes() -> None:
    cost = FixedCost(None, base=0.01, token_s=0.001)
    cost.floor_s = 0.05
    assert cost.target_s(decode_s=0.04) == pytest.approx(0.12)  # 3x
    assert cost.target_s(decode_s=0.01) == 0.05  # the floor


def test_long_contexts_buy_fewer_prefill_tokens() -> None:
    cost = FixedCost(0.1, token_s=0.001, pair_s=1e-6)
    assert cost.affordable_tokens(-0.01, 100) == cost.affordable_tokens(0.0, 100) == 0
    near, far = cost.affordable_tokens(0.05, 0), cost.affordable_tokens(0.05, 3000)
    assert far < near <= 50
    x = far  # the chunk it allows fits, one more token would not
    assert (
        0.001 * x + 1e-6 * x * (2 * 3000 + x + 1) / 2
        <= 0.05
        < 0.001 * (x + 1) + 1e-6 * (x + 1) * (6000 + x + 2) / 2
    )


def test_queue_full_too_long_and_too_many_choices_are_refused() -> None:
    sched = make_scheduler(max_waiting=1, max_model_len=64, max_num_seqs=4)
    sched.add(make_request(4))
    with pytest.raises(QueueFullError):
        sched.add(make_request(4))
    with pytest.raises(InvalidRequestError):
        make_scheduler(max_num_seqs=2).add(make_request(4, n=3))
    with pytest.raises(PromptTooLongError, match="max_model_len 64"):
        sched.check_fits(60, 8)
    assert sched.check_fits(60, None) == 4
    # n choices must fit the cache together at full length (64 usable blocks of 4 tokens here).
    assert sched.check_fits(30, 34, n=4) == 34
    with pytest.raises(InvalidRequestError, match="n=5") as info:
        sched.check_fits(30, 34, n=5)
    assert info.value.param == "n"


def test_a_request_that_fills_the_whole_cache_is_admitted_when_alone() -> None:
    """The growth reserve protects running sequences; it must not keep out a request that needs
    every block when nothing else runs (it would wait forever)."""
    sched = make_scheduler(blocks=9, block_size=4, max_model_len=32, reserve=1)
    request = make_request(31, n=1, max_tokens=1)  # 8 blocks: all of them
    request.max_tokens = sched.check_fits(request.prompt_len, 1)
    sched.add(request)
    engine = FakeEngine(sched)
    engine.run()
    assert request.finished


# -- memory: preemption, forks, prefix reuse --------------------------------------------------------


def test_running_out_of_blocks_preempts_the_newest_and_recomputes_it() -> None:
    sched = make_scheduler(blocks=9, block_size=4, max_model_len=32, reserve=0)  # 8 usable blocks
    engine = FakeEngine(sched)
    requests = [make_request([i] + [1, 2, 3], max_tokens=10) for i in range(3)]  # 4 + 10 tokens: 4 blocks
    for request in requests:
        sched.add(request)
    engine.run()
    assert len(engine.finished) == 3 and sched.num_preemptions >= 1
    assert requests[-1].num_preemptions >= 1 and requests[0].num_preemptions == 0
    for request in requests:  # what was generated before the preemption was kept, not redone
        assert len(request.seqs[0].output_ids) == 10
    assert sched.kv.pool.num_used == 0


def test_n_choices_share_the_prompt_and_copy_only_the_partial_block() -> None:
    sched = make_scheduler(blocks=64, block_size=4)
    engine = FakeEngine(sched)
    request = make_request(10, n=3, max_tokens=6)  # blocks [0-3] [4-7] full, [8-9] partial
    sched.add(request)
    plan = engine.step()
    assert [c.seq.index for c in plan.chunks] == [0]  # only the first choice prefills
    first, second, third = request.seqs
    assert second.block_table[:2] == first.block_table[:2] == third.block_table[:2]
    plan = engine.step()
    assert len(plan.copies) == 2  # two of the three take their own copy of the partial block
    assert sched.kv.pool.refs[first.block_table[0]] == 3
    engine.run()
    assert len({tuple(s.output_ids) for s in request.seqs}) == 3  # they diverged, each reading its own KV


def test_a_repeated_prompt_reuses_the_cached_prefix() -> None:
    sched = make_scheduler(blocks=64, block_size=4)
    engine = FakeEngine(sched)
    first = make_request(list(range(21)), max_tokens=3)
    sched.add(first)
    engine.run()
    again = make_request(list(range(21)) + [5, 6], max_tokens=3)  # turn 2: same prefix, more tokens
    sched.add(again)
    plan = engine.step()
    assert again.num_cached_tokens == 20 and plan.chunks[0].start == 20
    engine.run()
    off = make_scheduler(blocks=64, block_size=4, prefix_caching=False)
    engine = FakeEngine(off)
    for _ in range(2):
        request = make_request(list(range(21)), max_tokens=3)
        off.add(request)
        engine.run()
        assert request.num_cached_tokens == 0


def test_images_encode_in_order_within_the_tile_budget_and_gate_the_prefill() -> None:
    sched = make_scheduler(blocks=200, max_num_batched_tokens=500, max_model_len=512)
    sched.cost = FixedCost(None, max_tiles=3)
    engine = FakeEngine(sched)
    request = make_request(200, max_tokens=2, images=[("a", 5, 4, 10), ("b", 60, 2, 10)])
    sched.add(request)
    plans = []
    while not request.finished:
        plans.append(engine.step())
    tiles = [[(t.image.key, t.start, t.end) for t in p.vision] for p in plans]
    assert tiles[:2] == [[("a", 0, 3)], [("a", 3, 4), ("b", 0, 2)]]
    assert plans[0].chunks[0].end == 5 + 30  # up to the first tile not yet encoded


def _image_beside_a_stream(
    tiles: int, shares: tuple[float, ...] | None = None
) -> tuple[list[StepPlan], Request, Request]:
    """The plans of the steps that encode an image of `tiles` tiles (6 vision stages of those
    `shares`, a tile worth three steps) while a stream decodes; and the image's and the stream's
    requests."""
    sched = make_scheduler(blocks=200, max_model_len=512)
    sched.vision_stages = 6
    sched.vision_stage_shares = shares
    sched.cost = FixedCost(0.1005, base=0.0, token_s=0.0001, tile_s=0.3)
    engine = FakeEngine(sched)
    streaming = make_request(8, max_tokens=100)
    sched.add(streaming)
    engine.step()
    image = make_request(60, max_tokens=2, images=[("img", 4, tiles, 10)])
    sched.add(image)
    plans = []
    while not image.finished:
        plans.append(engine.step())
    return plans, image, streaming


def test_a_tile_too_long_for_the_step_is_encoded_in_slices_of_its_stages() -> None:
    plans, image, streaming = _image_beside_a_stream(2)
    assert all(plan.num_tiles == 0 for plan in plans)  # never a whole tile while a stream decodes
    tasks = [(t.start, t.stages) for plan in plans for t in plan.vision]
    assert tasks == [(0, (0, 2)), (0, (2, 4)), (0, (4, 6)), (1, (0, 2)), (1, (2, 4)), (1, (4, 6))]
    assert image.images[0].tiles_ready == 2 and not streaming.finished


def test_slices_of_a_tile_follow_the_cost_of_its_stages() -> None:
    """A ViT layer costs several times the patch embedding or the projector: slices are cut by
    each stage's share of the tile's time, not by equal counts of stages."""
    plans, _, _ = _image_beside_a_stream(1, (1.0, 4.0, 4.0, 4.0, 4.0, 1.0))  # 0.017, 4 x 0.067, 0.017 s
    assert [t.stages for plan in plans for t in plan.vision] == [(0, 2), (2, 3), (3, 4), (4, 6)]


def test_two_different_images_share_no_blocks_but_the_same_image_does() -> None:
    sched = make_scheduler(blocks=200, block_size=4)
    engine = FakeEngine(sched)
    cat = make_request(40, max_tokens=2, images=[("cat", 8, 2, 8)])
    sched.add(cat)
    engine.run()
    dog = make_request(40, max_tokens=2, images=[("dog", 8, 2, 8)])
    sched.add(dog)
    engine.run()
    assert dog.num_cached_tokens == 8  # the text before the image
    cat_again = make_request(40, max_tokens=2, images=[("cat", 8, 2, 8)])
    sched.add(cat_again)
    engine.run()
    assert cat_again.num_cached_tokens == 36


def test_abort_frees_everything_wherever_the_request_is() -> None:
    sched = make_scheduler()
    engine = FakeEngine(sched)
    running, waiting = make_request(20, max_tokens=50), make_request(20, max_tokens=50)
    sched.add(running)
    engine.step()
    sched.add(waiting)
    sched.abort(running)
    sched.abort(waiting)
    assert not sched.has_work and sched.kv.pool.num_used == 0
    assert all(s.finished for s in running.seqs + waiting.seqs)


# -- property-based ---------------------------------------------------------------------------------


class SchedulerMachine(RuleBasedStateMachine):
    """Random arrivals (shared prefixes, images, n > 1), stops, aborts and steps in a small pool."""

    def __init__(self) -> None:
        super().__init__()
        self.sched = make_scheduler(blocks=25, block_size=4, max_model_len=60, max_num_batched_tokens=24)
        self.stop_at: dict[int, int] = {}
        self.engine = FakeEngine(self.sched)

    @rule(
        base=st.integers(0, 2),
        extra=st.integers(1, 20),
        n=st.integers(1, 3),
        max_tokens=st.integers(1, 12),
        with_image=st.booleans(),
        image_key=st.sampled_from(["x", "y"]),
    )
    def arrive(
        self, base: int, extra: int, n: int, max_tokens: int, with_image: bool, image_key: str
    ) -> None:
        prompt = [base] * 8 + list(range(extra))  # a few shared prefixes
        images = [(image_key, 2, 2, 3)] if with_image else []
        request = make_request(prompt, n=n, max_tokens=min(max_tokens, 60 - len(prompt)), images=images)
        try:  # as Engine.add does
            request.max_tokens = self.sched.check_fits(request.prompt_len, request.max_tokens, n=n)
        except InvalidRequestError:
            return  # n choices that cannot all fit the cache at once
        with contextlib.suppress(QueueFullError):
            self.sched.add(request)

    @rule(data=st.data())
    @precondition(lambda self: self.sched.running or self.sched.waiting)
    def abort(self, data: st.DataObject) -> None:
        pool = list(self.sched.running) + list(self.sched.waiting)
        self.sched.abort(data.draw(st.sampled_from(pool)))

    @rule(steps=st.integers(1, 6), stop_mod=st.integers(2, 9))
    def step(self, steps: int, stop_mod: int) -> None:
        for _ in range(steps):
            if self.sched.has_work:
                self.engine.step(stop=lambda seq: seq.output_ids[-1] % stop_mod == 0)

    @invariant()
    def consistent(self) -> None:
        self.engine.check()
        assert self.sched.kv.pool.num_used <= self.sched.kv.pool.num_usable

    def teardown(self) -> None:
        self.engine.run()
        assert self.sched.kv.pool.num_used == 0


TestSchedulerMachine = SchedulerMachine.TestCase
TestSchedulerMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


def test_the_cost_model_learns_its_weights_from_measured_steps() -> None:
    cost = StepCostModel(None, max_tokens=8192, max_tiles=16)
    truth = (0.004, 3e-6, 5e-9, 4e-5)
    for start, tokens in [(0, 1), (0, 2000), (2000, 3000), (9000, 1), (0, 500)] * 3:
        pairs = attention_pairs(start, start + tokens)
        cost.observe_lm(tokens, pairs, truth[0] + truth[1] * tokens + truth[2] * pairs)
    weights = cost._weights()
    assert weights[:3] == pytest.approx(truth[:3], rel=1e-3)
    assert weights[3] == 1e-4  # never scored a prompt: the prior, not a meaningless zero
    for start, tokens in [(0, 1000), (5000, 800)] * 2:
        pairs = attention_pairs(start, start + tokens)
        seconds = truth[0] + truth[1] * tokens + truth[2] * pairs + truth[3] * tokens
        cost.observe_lm(tokens, pairs, seconds, tokens)
    assert cost._weights() == pytest.approx(truth, rel=1e-3)


def test_a_weight_the_data_make_negative_is_zero_and_the_rest_refitted() -> None:
    # Timings whose unconstrained fit has a negative per-token cost (noise on a model whose dense
    # layers are nearly free next to attention): the fit keeps the attention cost, not a prior.
    cost = StepCostModel(None, max_tokens=8192, max_tiles=16)
    steps = [(0, 4000, 0.04), (4000, 4000, 0.2), (8000, 4000, 0.4), (0, 100, 0.001)]
    for start, tokens, seconds in steps * 2:
        cost.observe_lm(tokens, attention_pairs(start, start + tokens), seconds)
    a, b, c, _ = cost._weights()
    assert b == 0.0 and c > 0.0
    assert cost.affordable_tokens(0.25, 20_000) > 100
