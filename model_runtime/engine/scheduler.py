"""The scheduler: who waits, who runs, and what each step computes. Pure Python, no torch.

Every step is one packed forward. It carries, in this order:
1. one token for every running sequence that is decoding: streams advance every step;
2. prompt chunks of sequences being prefilled, first come first served, as far as the step's token
   budget and their images' encoded tiles allow;
3. the first chunks of newly admitted requests;
and, before the forward, the vision-tower work (a few tiles) those prompts need next.

Budgets. While sequences are decoding, prefill tokens and vision tiles are budgeted so that a step
stays near a target duration (`StepCostModel`, learned from measured steps): a burst of large
images is encoded a few tiles per step instead of freezing every stream for seconds. With nothing
decoding, a step takes as much as `max_num_batched_tokens` allows.

Memory. Admission reserves blocks for a request's whole prompt (less what the prefix cache
already holds) and keeps a small reserve free; decoding takes one block every `block_size`
tokens. When decoding needs a block and none is free, the most recently admitted request is
preempted: its blocks are freed and it goes back to the front of the queue, keeping what it has
generated; it is recomputed when memory allows (its prompt usually from the prefix cache). Nothing
is truncated and nothing fails for lack of memory: a request that could never fit (prompt plus
max_tokens over max_model_len, which the pool always holds) is refused when it arrives.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from model_runtime.engine.block_manager import KVCacheManager
from model_runtime.engine.sequence import ImageSlot, Request, Sequence, Status
from model_runtime.errors import InvalidRequestError, PromptTooLongError, QueueFullError


@dataclass(frozen=True)
class Chunk:
    """Tokens [start, end) of `seq` to compute this step."""

    seq: Sequence
    start: int
    end: int

    @property
    def samples(self) -> bool:
        """The chunk reaches the sequence's last token, whose logits give the next one."""
        return self.end == self.seq.num_tokens


@dataclass(frozen=True)
class VisionTask:
    """Tiles [start, end) of `image` to encode this step."""

    image: ImageSlot
    start: int
    end: int


@dataclass
class StepPlan:
    """What one engine step runs."""

    chunks: list[Chunk] = field(default_factory=list)
    vision: list[VisionTask] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # (source, destination) blocks
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.end - c.start for c in self.chunks)

    @property
    def num_tiles(self) -> int:
        return sum(v.end - v.start for v in self.vision)

    @property
    def empty(self) -> bool:
        return not self.chunks and not self.vision


@dataclass(frozen=True)
class StepBudget:
    tokens: int  # prefill tokens, beyond the decodes
    tiles: int  # vision tiles


class _LinearFit:
    """seconds ~ a + b * x, least squares over recent observations (exponentially forgotten)."""

    def __init__(self, decay: float = 0.95) -> None:
        self.decay = decay
        self.s = [0.0] * 5  # sums of w, wx, wy, wxx, wxy

    def add(self, x: float, y: float) -> None:
        d = self.decay
        for i, term in enumerate((1.0, x, y, x * x, x * y)):
            self.s[i] = self.s[i] * d + term

    def params(self) -> tuple[float, float] | None:
        w, sx, sy, sxx, sxy = self.s
        if w <= 0:
            return None
        var = w * sxx - sx * sx
        if var <= 1e-9 * max(1.0, w * sxx):  # all at one x: a per-unit cost only
            return (0.0, sy / sx) if sx > 0 else None
        b = (w * sxy - sx * sy) / var
        a = (sy - b * sx) / w
        if b <= 0:  # noise; fall back to the average per-unit cost
            return (0.0, sy / sx) if sx > 0 else None
        return max(0.0, a), b


class StepCostModel:
    """How long a step takes, learned from measured steps; turns a target duration into budgets.

    The language model's time is fitted as a + b * tokens (a per-step overhead plus a cost per
    token, prefill or decode alike), the vision tower's as seconds per tile.
    """

    def __init__(
        self,
        target_s: float,
        *,
        max_tokens: int,
        max_tiles: int,
        min_tokens: int = 16,
        initial_token_s: float = 1e-3,
        initial_tile_s: float = 0.05,
    ) -> None:
        self.target_s = target_s
        self.max_tokens = max_tokens
        self.max_tiles = max_tiles
        self.min_tokens = min_tokens
        self._lm = _LinearFit()
        self._initial_token_s = initial_token_s
        self._tile_s: float | None = None
        self._initial_tile_s = initial_tile_s

    def observe_lm(self, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds > 0:
            self._lm.add(float(tokens), seconds)

    def observe_vision(self, tiles: int, seconds: float) -> None:
        if tiles > 0 and seconds > 0:
            per_tile = seconds / tiles
            self._tile_s = per_tile if self._tile_s is None else 0.8 * self._tile_s + 0.2 * per_tile

    def lm_seconds(self, tokens: int) -> float:
        fit = self._lm.params()
        a, b = fit if fit is not None else (0.0, self._initial_token_s)
        return a + b * tokens

    @property
    def tile_seconds(self) -> float:
        return self._tile_s if self._tile_s is not None else self._initial_tile_s

    def budget(self, decodes: int) -> StepBudget:
        if decodes == 0:
            return StepBudget(self.max_tokens, self.max_tiles)
        left = self.target_s - self.lm_seconds(decodes)
        tiles = max(1, min(self.max_tiles, int(left / self.tile_seconds)))
        left -= tiles * self.tile_seconds
        per_token = max(self.lm_seconds(decodes + 1) - self.lm_seconds(decodes), 1e-9)
        tokens = max(self.min_tokens, min(self.max_tokens - decodes, int(left / per_token)))
        return StepBudget(tokens, tiles)


class Scheduler:
    """Admission, budgets, preemption and block bookkeeping for the engine's steps."""

    def __init__(
        self,
        kv: KVCacheManager,
        cost: StepCostModel,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        max_waiting: int,
        reserve_blocks: int = 1,
    ) -> None:
        self.kv = kv
        self.cost = cost
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.max_waiting = max_waiting
        self.reserve_blocks = reserve_blocks
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order; the last is preempted first
        self.num_preemptions = 0

    # -- admission control -----------------------------------------------------------------------

    def check_fits(self, prompt_len: int, max_tokens: int | None, image_tokens: int = 0) -> int:
        """Return the effective max_tokens, or raise PromptTooLongError naming both numbers."""
        if max_tokens is None:
            if prompt_len >= self.max_model_len:
                raise PromptTooLongError(self._too_long(prompt_len, image_tokens, None), param="messages")
            return self.max_model_len - prompt_len
        if prompt_len + max_tokens > self.max_model_len:
            raise PromptTooLongError(self._too_long(prompt_len, image_tokens, max_tokens), param="messages")
        return max_tokens

    def _too_long(self, prompt_len: int, image_tokens: int, max_tokens: int | None) -> str:
        images = f" ({image_tokens} of them image tokens)" if image_tokens else ""
        if max_tokens is None:
            return (
                f"the prompt has {prompt_len} tokens{images}, which leaves no room to generate within "
                f"max_model_len {self.max_model_len}"
            )
        return (
            f"the prompt has {prompt_len} tokens{images} and max_tokens is {max_tokens}: "
            f"{prompt_len + max_tokens} exceeds max_model_len {self.max_model_len}"
        )

    def add(self, request: Request) -> None:
        if request.n > self.max_num_seqs:
            raise InvalidRequestError(
                f"n={request.n} exceeds the {self.max_num_seqs} sequences this server runs at once", param="n"
            )
        if len(self.waiting) >= self.max_waiting:
            raise QueueFullError("the server is at capacity (waiting queue full); retry later")
        self.waiting.append(request)

    # -- planning --------------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        self._schedule_decodes(plan)
        budget = self.cost.budget(len(plan.chunks))
        tokens = min(budget.tokens, self.max_num_batched_tokens - len(plan.chunks))
        tiles = budget.tiles
        planned: dict[int, int] = {}  # id(image) -> tiles_ready after this step's vision work
        for request in self.running:
            for seq in request.active_seqs():
                if seq.num_pending > 1 and (tokens > 0 or tiles > 0):
                    tokens, tiles = self._schedule_prefill(plan, seq, tokens, tiles, planned)
        while self.waiting and (tokens > 0 or tiles > 0) and self._admit(self.waiting[0]):
            request = self.waiting.popleft()
            self.running.append(request)
            for seq in request.active_seqs():
                tokens, tiles = self._schedule_prefill(plan, seq, tokens, tiles, planned)
        return plan

    def _schedule_decodes(self, plan: StepPlan) -> None:
        copies: list[tuple[int, int, Request]] = []
        for request in list(self.running):
            if request not in self.running:  # preempted below, for an earlier request's decode
                continue
            for seq in request.active_seqs():
                if seq.num_pending != 1:
                    continue
                position = seq.num_computed
                grow = self.kv.blocks_for(position + 1) - len(seq.block_table)
                shared = grow <= 0 and self.kv.pool.refs[seq.block_table[position // self.kv.block_size]] > 1
                while self.kv.pool.num_free < grow + int(shared):
                    victim = self.running[-1]
                    self._preempt(victim, plan)
                    if victim is request:
                        break
                if request not in self.running:  # this request was the victim
                    break
                if grow > 0:
                    assert self.kv.allocate(seq, position + 1)
                elif shared:
                    copy = self.kv.copy_on_write(seq, position)
                    assert copy is not None
                    copies.append((*copy, request))
                plan.chunks.append(Chunk(seq, position, position + 1))
        live = {id(r) for r in self.running}
        plan.copies = [(src, dst) for src, dst, r in copies if id(r) in live]

    def _preempt(self, request: Request, plan: StepPlan) -> None:
        """Free a running request's blocks and queue it first, to be recomputed later."""
        self.running.remove(request)
        for seq in request.seqs:
            if not seq.finished:
                self.kv.free(seq)
                seq.status = Status.WAITING
        plan.chunks = [c for c in plan.chunks if c.seq.request is not request]
        plan.preempted.append(request)
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _admit(self, request: Request) -> bool:
        """Give the request's computing sequences blocks for all their tokens, taking what the
        prefix cache holds; False (nothing held) if that would leave less than the reserve free."""
        if sum(len(r.active_seqs()) for r in self.running) + request.n > self.max_num_seqs:
            return False
        seqs = request.active_seqs()
        cached = [self.kv.match_prefix(seq) for seq in seqs]
        need = sum(self.kv.blocks_for(s.num_tokens) - len(s.block_table) for s in seqs)
        if need + self.reserve_blocks > self.kv.pool.num_free:
            for seq in seqs:
                self.kv.free(seq)
            return False
        for seq, hit in zip(seqs, cached, strict=True):
            assert self.kv.allocate(seq, seq.num_tokens)
            seq.num_computed = hit
            seq.status = Status.RUNNING
        if request.first_scheduled_time is None:
            request.first_scheduled_time = time.monotonic()
            request.num_cached_tokens = cached[0]
        return True

    def _schedule_prefill(
        self, plan: StepPlan, seq: Sequence, tokens: int, tiles: int, planned: dict[int, int]
    ) -> tuple[int, int]:
        """Plan vision work and a prompt chunk for seq within the budgets; return what is left."""
        start = seq.num_computed
        limit = seq.num_tokens
        for image in seq.request.images:
            if image.end <= start or image.start >= limit:
                continue
            ready = planned.get(id(image), image.tiles_ready)
            if ready < image.num_tiles and tiles > 0:
                take = min(tiles, image.num_tiles - ready)
                plan.vision.append(VisionTask(image, ready, ready + take))
                tiles -= take
                ready += take
                planned[id(image)] = ready
            if ready < image.num_tiles:
                limit = min(limit, image.start + ready * (image.num_tokens // image.num_tiles))
                break
        end = min(limit, start + tokens)
        if end > start:
            plan.chunks.append(Chunk(seq, start, end))
            tokens -= end - start
        return tokens, tiles

    # -- results ---------------------------------------------------------------------------------

    def computed(self, chunks: list[Chunk]) -> None:
        """The runner computed these chunks: advance the sequences and cache their full blocks."""
        for chunk in chunks:
            chunk.seq.num_computed = chunk.end
            self.kv.cache_computed(chunk.seq)

    def fork(self, request: Request) -> None:
        """The shared prompt is done: every other choice takes the first one's blocks."""
        first = request.seqs[0]
        for seq in request.seqs[1:]:
            self.kv.fork(first, seq)
            seq.status = Status.RUNNING

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason = seq.finish_reason or reason
        self.kv.free(seq)
        request = seq.request
        if request.finished and request in self.running:
            self.running.remove(request)

    def abort(self, request: Request, reason: str = "abort") -> None:
        """Remove a request wherever it is and free its blocks."""
        if request in self.waiting:
            self.waiting.remove(request)
        for seq in request.seqs:
            if not seq.finished:
                self.finish(seq, reason)
        if request in self.running:
            self.running.remove(request)

    # -- introspection ---------------------------------------------------------------------------

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)
