"""The scheduler without torch: admission, token budgets, chunked prefill, slots and their moves.

A fake KV cache (one list of token labels per slot) stands in for the runner's tensors: prefill and
decode write labels where the runner would write keys and values, and every `SlotMove` the
scheduler returns is applied to it, so a wrong move shows up as a sequence whose cache holds
someone else's tokens.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from model_runtime.engine.scheduler import PrefillChunk, Scheduler, SlotMove, StepPlan
from model_runtime.engine.sequence import Request, Sequence, Status
from model_runtime.errors import InvalidRequestError, PromptTooLongError, QueueFullError
from model_runtime.sampling_params import SamplingParams

_ids = itertools.count()
RARELY = st.sampled_from([False] * 7 + [True])  # shrinks towards False


def make_request(prompt_len: int, *, n: int = 1, max_tokens: int = 8) -> Request:
    rid = f"req-{next(_ids)}"
    params = SamplingParams(n=n, max_tokens=max_tokens, temperature=0.0)
    return Request(request_id=rid, prompt_ids=[7] * prompt_len, params=params, max_tokens=max_tokens)


def make_scheduler(
    *, num_slots: int = 4, max_num_batched_tokens: int = 64, max_model_len: int = 128, max_waiting: int = 16
) -> Scheduler:
    return Scheduler(
        num_slots=num_slots,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
        max_waiting=max_waiting,
    )


def spans(plan: StepPlan) -> list[tuple[str, int, int]]:
    return [(c.request.request_id, c.start, c.end) for c in plan.prefills]


def plan_tokens(plan: StepPlan) -> int:
    return len(plan.decodes) + sum(c.end - c.start for c in plan.prefills)


def check_slots(sched: Scheduler) -> None:
    """Decoders fill slots 0..D-1; each prefilling request's n slots follow, in admission order."""
    assert [s.slot for s in sched.decoding] == list(range(len(sched.decoding)))
    assert all(s.status is Status.DECODING for s in sched.decoding)
    base = len(sched.decoding)
    for request in sched.prefilling:
        assert request.base_slot == base
        base += request.n
    assert sched.used_slots == base <= sched.num_slots


class FakeEngine:
    """Drives a Scheduler as the engine does, writing token labels into a fake slot cache."""

    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched
        self.cache: list[list[object]] = [[None] * sched.max_model_len for _ in range(sched.num_slots)]

    def apply(self, moves: list[SlotMove]) -> None:
        for src, dst, tokens in moves:
            assert 0 <= src < self.sched.num_slots and 0 <= dst < self.sched.num_slots
            if src != dst and tokens > 0:
                self.cache[dst][:tokens] = self.cache[src][:tokens]

    def check(self) -> None:
        """The invariants hold at every point of a step, not only between steps."""
        check_slots(self.sched)
        self.check_cache()

    def prefill(self, chunk: PrefillChunk) -> None:
        request = chunk.request
        assert chunk.start == request.num_computed < chunk.end <= request.prompt_len
        row = self.cache[request.base_slot]
        for pos in range(chunk.start, chunk.end):
            row[pos] = (request.request_id, pos)
        if chunk.completes:  # the runner forks the prompt into the sibling slots
            for sibling in range(1, request.n):
                self.apply([(request.base_slot, request.base_slot + sibling, request.prompt_len)])
        self.sched.prefilled(chunk)
        self.check()

    def decode(self, seqs: list[Sequence]) -> None:
        for row, seq in enumerate(seqs):
            assert seq.slot == row, "the decode batch is slots 0..B-1"
            pos = seq.num_tokens - 1
            self.cache[row][pos] = (seq.request.request_id, seq.index, pos)

    def finish(self, seq: Sequence, reason: str = "stop") -> None:
        self.apply(self.sched.finish(seq, reason))
        self.check()

    def abort(self, request: Request, reason: str = "abort") -> None:
        self.apply(self.sched.abort(request, reason))
        self.check()

    def step(
        self,
        stop_early: Callable[[Sequence], bool] = lambda seq: False,
        fail_prefill: Callable[[Request], bool] = lambda request: False,
    ) -> StepPlan:
        """schedule -> prefill chunks -> decode, as `Engine.step`.

        A sequence finishes at max_tokens or when `stop_early` says so; a prefill for which
        `fail_prefill` is true fails its request (aborted mid-step, as the engine isolates it).
        """
        plan = self.sched.schedule()
        assert plan.decodes == self.sched.decoding
        for chunk in plan.prefills:
            if chunk.request.finished:
                continue
            if fail_prefill(chunk.request):
                self.abort(chunk.request, "error")
                continue
            self.prefill(chunk)
            if chunk.completes:
                self.append_tokens(list(chunk.request.seqs), stop_early)
        self.decode(plan.decodes)
        self.append_tokens(plan.decodes, stop_early)
        return plan

    def append_tokens(self, seqs: list[Sequence], stop_early: Callable[[Sequence], bool]) -> None:
        for seq in seqs:
            assert not seq.finished
            seq.output_ids.append(1)
            if len(seq.output_ids) >= seq.request.max_tokens:
                self.finish(seq, "length")
            elif stop_early(seq):
                self.finish(seq, "stop")

    def check_cache(self) -> None:
        """Every live sequence's cache rows hold its own tokens, wherever it has been moved."""
        for seq in self.sched.decoding:
            rid = seq.request.request_id
            written = seq.num_tokens - 1  # the newest token's keys are written by the next decode
            expected = [
                (rid, p) if p < seq.request.prompt_len else (rid, seq.index, p) for p in range(written)
            ]
            assert self.cache[seq.slot][:written] == expected
        for request in self.sched.prefilling:
            expected = [(request.request_id, p) for p in range(request.num_computed)]
            assert self.cache[request.base_slot][: request.num_computed] == expected


# -- admission -------------------------------------------------------------------------------------


def test_admission_is_fifo_within_the_token_budget() -> None:
    sched = make_scheduler(num_slots=8, max_num_batched_tokens=100)
    a, b, c, d, e = (make_request(n) for n in (10, 20, 30, 50, 5))
    for request in (a, b, c, d, e):
        sched.add(request)
    plan = sched.schedule()
    # d gets the 40 tokens left and is cut; nobody is admitted behind a partial prefill.
    assert spans(plan) == [
        (a.request_id, 0, 10),
        (b.request_id, 0, 20),
        (c.request_id, 0, 30),
        (d.request_id, 0, 40),
    ]
    assert [r.base_slot for r in (a, b, c, d)] == [0, 1, 2, 3]
    assert list(sched.waiting) == [e]
    assert all(s.status is Status.PREFILLING for r in (a, b, c, d) for s in r.seqs)
    assert e.seqs[0].status is Status.WAITING
    check_slots(sched)


def test_admission_is_fifo_within_the_slot_budget() -> None:
    sched = make_scheduler(num_slots=3)
    a, b, c = make_request(4, n=2), make_request(4, n=2), make_request(4, n=1)
    for request in (a, b, c):
        sched.add(request)
    engine = FakeEngine(sched)
    plan = engine.step()
    # b needs 2 slots and 1 is free; c fits but must not overtake b.
    assert spans(plan) == [(a.request_id, 0, 4)]
    assert list(sched.waiting) == [b, c]
    assert sched.used_slots == 2
    for seq in list(a.seqs):
        engine.finish(seq)
    plan = engine.step()
    assert spans(plan) == [(b.request_id, 0, 4), (c.request_id, 0, 4)]
    assert sched.used_slots == 3
    check_slots(sched)
    engine.check_cache()


def test_new_requests_join_running_decoders() -> None:
    sched = make_scheduler(num_slots=4, max_num_batched_tokens=32)
    engine = FakeEngine(sched)
    a = make_request(5, max_tokens=10)
    sched.add(a)
    engine.step()
    b = make_request(6, max_tokens=10)
    sched.add(b)
    plan = engine.step()
    assert plan.decodes == [a.seqs[0]]
    assert spans(plan) == [(b.request_id, 0, 6)]
    assert [s.request for s in sched.decoding] == [a, b]
    check_slots(sched)
    engine.check_cache()


# -- chunked prefill and the token budget ----------------------------------------------------------


def test_long_prompt_is_prefilled_in_chunks_while_others_decode() -> None:
    sched = make_scheduler(num_slots=4, max_num_batched_tokens=16, max_model_len=128)
    engine = FakeEngine(sched)
    short = [make_request(3, max_tokens=50), make_request(4, max_tokens=50)]
    for request in short:
        sched.add(request)
    engine.step()
    assert len(sched.decoding) == 2
    long = make_request(40, max_tokens=4)
    later = make_request(2, max_tokens=4)
    sched.add(long)
    sched.add(later)

    chunks = []
    while long.num_computed < long.prompt_len:
        plan = engine.step()
        assert plan.decodes[:2] == [r.seqs[0] for r in short], "decoders keep decoding during the prefill"
        assert plan_tokens(plan) <= sched.max_num_batched_tokens
        chunks += [(c.start, c.end) for c in plan.prefills if c.request is long]
        if long.num_computed < long.prompt_len:
            assert later in sched.waiting, "nothing is admitted behind a partial prefill"
        check_slots(sched)
        engine.check_cache()
    assert chunks == [(0, 14), (14, 28), (28, 40)]
    assert long.seqs[0].status is Status.DECODING
    assert long.seqs[0].slot == 2


def test_decodes_and_prefill_tokens_fill_the_budget_exactly() -> None:
    sched = make_scheduler(num_slots=8, max_num_batched_tokens=10)
    engine = FakeEngine(sched)
    for _ in range(3):
        sched.add(make_request(1, max_tokens=100))
    engine.step()
    big = make_request(30)
    sched.add(big)
    plan = engine.step()
    assert len(plan.decodes) == 3
    assert spans(plan) == [(big.request_id, 0, 7)]
    assert plan_tokens(plan) == 10


def test_budget_must_cover_one_decode_per_slot() -> None:
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        make_scheduler(num_slots=8, max_num_batched_tokens=4)


# -- n > 1 -----------------------------------------------------------------------------------------


def test_n_reserves_n_slots_and_forks_the_prompt() -> None:
    sched = make_scheduler(num_slots=4)
    engine = FakeEngine(sched)
    a = make_request(6, n=3)
    b = make_request(6, n=2)
    sched.add(a)
    sched.add(b)
    plan = engine.step()
    assert spans(plan) == [(a.request_id, 0, 6)]
    assert sched.used_slots == 3
    assert [s.slot for s in a.seqs] == [0, 1, 2]
    assert list(sched.waiting) == [b]
    engine.check_cache()
    engine.finish(a.seqs[0])
    plan = engine.step()
    assert spans(plan) == [(b.request_id, 0, 6)]
    assert sched.used_slots == 4
    check_slots(sched)
    engine.check_cache()


def test_n_larger_than_the_slots_is_refused() -> None:
    sched = make_scheduler(num_slots=4)
    with pytest.raises(InvalidRequestError) as info:  # retrying can never succeed: a 400, not a 503
        sched.add(make_request(3, n=5))
    assert info.value.param == "n"
    assert not sched.has_work


# -- refusals --------------------------------------------------------------------------------------


def test_queue_full() -> None:
    sched = make_scheduler(num_slots=1, max_waiting=2)
    sched.add(make_request(3))
    sched.add(make_request(3))
    with pytest.raises(QueueFullError):
        sched.add(make_request(3))
    assert sched.num_waiting == 2
    sched.schedule()  # one leaves the queue for a slot
    sched.add(make_request(3))
    assert sched.num_waiting == 2


def test_check_fits() -> None:
    sched = make_scheduler(max_model_len=100)
    assert sched.check_fits(90, 10) == 10
    assert sched.check_fits(90, None) == 10
    with pytest.raises(PromptTooLongError) as info:
        sched.check_fits(90, 20)
    assert "90" in info.value.message and "20" in info.value.message and "100" in info.value.message
    with pytest.raises(PromptTooLongError) as info:
        sched.check_fits(100, None)
    assert "100 tokens" in info.value.message and "max_model_len 100" in info.value.message
    with pytest.raises(PromptTooLongError) as info:
        sched.check_fits(120, 1, image_tokens=80)
    assert "120" in info.value.message and "80" in info.value.message and "100" in info.value.message


# -- abort and finish free everything --------------------------------------------------------------


def test_abort_wherever_a_request_is_frees_its_slots() -> None:
    sched = make_scheduler(num_slots=4, max_num_batched_tokens=16)
    engine = FakeEngine(sched)
    decoding = make_request(4, n=2, max_tokens=50)
    prefilling = make_request(40, max_tokens=5)
    waiting = make_request(3)
    for request in (decoding, prefilling, waiting):
        sched.add(request)
    engine.step()
    engine.step()
    assert [s.status for s in decoding.seqs] == [Status.DECODING] * 2
    assert prefilling.seqs[0].status is Status.PREFILLING and 0 < prefilling.num_computed < 40
    assert waiting.seqs[0].status is Status.WAITING
    assert sched.used_slots == 3 and sched.used_tokens() > 0

    engine.abort(waiting)
    assert sched.num_waiting == 0
    engine.abort(decoding)  # the mid-prefill prompt moves down to slot 0
    assert prefilling.base_slot == 0
    check_slots(sched)
    engine.check_cache()
    engine.abort(prefilling)
    for request in (decoding, prefilling, waiting):
        assert request.finished
        assert all(s.finish_reason == "abort" and s.slot == -1 for s in request.seqs)
    assert sched.used_slots == 0
    assert sched.used_tokens() == 0
    assert not sched.has_work
    assert sched.schedule().empty


def test_finishing_the_last_decoder_moves_nothing_and_a_middle_one_moves_the_last() -> None:
    sched = make_scheduler(num_slots=4)
    engine = FakeEngine(sched)
    a, b, c = (make_request(3 + i, max_tokens=9) for i in range(3))
    for request in (a, b, c):
        sched.add(request)
    engine.step()
    engine.step()
    assert sched.finish(c.seqs[0], "stop") == []
    moves = sched.finish(a.seqs[0], "stop")
    assert moves == [(1, 0, b.seqs[0].num_tokens)]
    assert sched.decoding == [b.seqs[0]] and b.seqs[0].slot == 0


def test_a_finished_sequence_frees_its_slot_for_the_queue() -> None:
    sched = make_scheduler(num_slots=1)
    engine = FakeEngine(sched)
    a, b = make_request(3, max_tokens=2), make_request(3, max_tokens=2)
    sched.add(a)
    sched.add(b)
    engine.step()  # a prefilled, first token
    assert list(sched.waiting) == [b]
    engine.step()  # a decodes its second token and finishes
    assert a.finished and a.seqs[0].finish_reason == "length"
    plan = engine.step()
    assert spans(plan) == [(b.request_id, 0, 3)]
    engine.step()
    assert b.finished
    assert sched.used_slots == 0 and sched.used_tokens() == 0 and not sched.has_work


# -- randomized: what the engine does, in any order -------------------------------------------------


class SchedulerMachine(RuleBasedStateMachine):
    """Random adds, steps, finishes and aborts; slots stay contiguous and each cache row its owner's."""

    @initialize(
        num_slots=st.integers(1, 6),
        extra_budget=st.integers(0, 10),
        max_model_len=st.integers(16, 64),
        max_waiting=st.integers(1, 6),
    )
    def setup(self, num_slots: int, extra_budget: int, max_model_len: int, max_waiting: int) -> None:
        self.sched = make_scheduler(
            num_slots=num_slots,
            max_num_batched_tokens=num_slots + extra_budget,
            max_model_len=max_model_len,
            max_waiting=max_waiting,
        )
        self.engine = FakeEngine(self.sched)
        self.requests: list[Request] = []

    def live(self) -> list[Request]:
        return [r for r in self.requests if not r.finished]

    @rule(data=st.data(), n=st.integers(1, 3))
    def add(self, data: st.DataObject, n: int) -> None:
        limit = self.sched.max_model_len
        prompt_len = data.draw(st.integers(1, limit - 1), label="prompt_len")
        max_tokens = data.draw(st.integers(1, limit - prompt_len), label="max_tokens")
        assert self.sched.check_fits(prompt_len, max_tokens) == max_tokens
        request = make_request(prompt_len, n=n, max_tokens=max_tokens)
        if n > self.sched.num_slots:
            with pytest.raises(InvalidRequestError):
                self.sched.add(request)
        elif self.sched.num_waiting >= self.sched.max_waiting:
            with pytest.raises(QueueFullError):
                self.sched.add(request)
        else:
            self.sched.add(request)
            self.requests.append(request)

    @rule(data=st.data(), times=st.integers(1, 4))
    def step(self, data: st.DataObject, times: int) -> None:
        for _ in range(times):
            waiting_before = list(self.sched.waiting)
            had_work = self.sched.has_work
            plan = self.engine.step(
                stop_early=lambda seq: data.draw(RARELY, label=f"stop {seq.request.request_id}"),
                fail_prefill=lambda request: data.draw(RARELY, label=f"fail {request.request_id}"),
            )
            assert plan_tokens(plan) <= self.sched.max_num_batched_tokens
            admitted = [c.request for c in plan.prefills if c.start == 0]
            assert admitted == waiting_before[: len(admitted)], "admission is first come, first served"
            assert not plan.empty or not had_work, "a step with work to do computes something"
            self.engine.check()

    @precondition(lambda self: bool(self.sched.decoding))
    @rule(data=st.data())
    def finish_one(self, data: st.DataObject) -> None:
        self.engine.finish(data.draw(st.sampled_from(self.sched.decoding)))

    @precondition(lambda self: bool(self.live()))
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        request = data.draw(st.sampled_from(self.live()))
        self.engine.abort(request)
        assert request.finished
        assert all(s.slot == -1 for s in request.seqs)

    @invariant()
    def slots_are_contiguous(self) -> None:
        self.engine.check()

    @invariant()
    def accounting(self) -> None:
        sched = self.sched
        # Between steps every scheduled chunk has been computed: at most the newest admission is left,
        # mid-prefill.
        assert len(sched.prefilling) <= 1
        assert all(0 < r.num_computed < r.prompt_len for r in sched.prefilling)
        for request in self.live():
            statuses = {s.status for s in request.seqs}
            assert statuses in ({Status.WAITING}, {Status.PREFILLING}) or statuses <= {
                Status.DECODING,
                Status.FINISHED,
            }

    def teardown(self) -> None:
        if not hasattr(self, "sched"):
            return
        for request in self.live():
            self.engine.abort(request)
        assert self.sched.used_slots == 0
        assert self.sched.used_tokens() == 0
        assert not self.sched.has_work


TestSchedulerMachine = SchedulerMachine.TestCase
TestSchedulerMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
