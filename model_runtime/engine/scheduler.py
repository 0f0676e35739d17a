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
decoding, a step is held near a longer idle target, so a request that arrives while a long prompt
is prefilled waits at most about that long; and while a request waits behind prompts being
prefilled, part of each step is kept for it (what its prompt needs, at most half), so it is
admitted at the next step instead of after the whole long prompt.

Memory. Admission reserves blocks for a request's whole prompt (less what the prefix cache
already holds) and keeps a small reserve free; decoding takes one block every `block_size`
tokens. When decoding needs a block and none is free, the most recently admitted request is
preempted: its blocks are freed and it goes back to the front of the queue, keeping what it has
generated; it is recomputed when memory allows (its prompt usually from the prefix cache). Nothing
is truncated and nothing fails for lack of memory: a request that could never fit (prompt plus
max_tokens over max_model_len, which the pool always holds) is refused when it arrives.
"""

from __future__ import annotations

import statistics
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
    """Tiles [start, end) of `image` to encode this step, or only vision stages [first, last) of
    tile `start` (then end = start + 1): engine/vision.py."""

    image: ImageSlot
    start: int
    end: int
    stages: tuple[int, int] | None = None


@dataclass
class _Budget:
    """What is left of one step's budget while it is planned."""

    tokens: int
    tiles: int
    seconds: float
    prefilled: bool = False  # some prompt chunk got the guaranteed minimum already

    @property
    def spent(self) -> bool:
        return self.tokens <= 0 or (self.seconds <= 0 and self.prefilled)


@dataclass
class StepPlan:
    """What one engine step runs."""

    chunks: list[Chunk] = field(default_factory=list)
    vision: list[VisionTask] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # (source, destination) blocks
    preempted: list[Request] = field(default_factory=list)
    admitted: list[Request] = field(default_factory=list)  # scheduled for the first time

    @property
    def num_tokens(self) -> int:
        return sum(c.end - c.start for c in self.chunks)

    @property
    def num_tiles(self) -> int:
        """Tiles of vision work, a slice of a tile counted as its share."""
        return sum(v.end - v.start for v in self.vision if v.stages is None)

    @property
    def empty(self) -> bool:
        return not self.chunks and not self.vision


def _bucket(decodes: int) -> int:
    return 1 << (decodes - 1).bit_length()


def attention_pairs(start: int, end: int) -> int:
    """(query, key) pairs a chunk of positions [start, end) attends to: each sees every key up to its own."""
    return (end - start) * (start + end + 1) // 2


class _LeastSquares:
    """seconds ~ x . w over recent observations (exponentially forgotten), for small feature vectors."""

    def __init__(self, features: int, decay: float = 0.97) -> None:
        self.decay = decay
        self.xtx = [[0.0] * features for _ in range(features)]
        self.xty = [0.0] * features
        self.count = 0.0

    def add(self, x: list[float], y: float) -> None:
        d = self.decay
        for i, xi in enumerate(x):
            self.xty[i] = self.xty[i] * d + xi * y
            for j, xj in enumerate(x):
                self.xtx[i][j] = self.xtx[i][j] * d + xi * xj
        self.count = self.count * d + 1.0

    def seen(self, feature: int) -> bool:
        """Whether any recent observation had this feature non-zero (else its weight is meaningless)."""
        return self.xtx[feature][feature] > 0.0

    def weights(self) -> list[float] | None:
        """Non-negative weights of the least-squares fit, or None before any observation.

        A weight the unconstrained fit makes negative is fixed at zero and the rest refitted (so
        a small model whose per-token cost hides in the attention term still gets a usable fit,
        instead of one clipped into nonsense); features never observed get zero. The columns are
        scaled to unit norm first: the attention pairs are ~10^8 times the constant feature."""
        if self.count < 1.0:
            return None
        n = len(self.xty)
        free = [i for i in range(n) if self.seen(i)]
        while free:
            solved = self._solve(free)
            if solved is None:
                return None
            negative = [i for i in free if solved[i] < 0.0]
            if not negative:
                return [max(0.0, solved.get(i, 0.0)) for i in range(n)]
            free.remove(min(negative, key=lambda i: solved[i]))
        return None

    def _solve(self, free: list[int]) -> dict[int, float] | None:
        """The normal equations restricted to the `free` features (Gauss-Jordan, partial pivoting)."""
        scale = [self.xtx[i][i] ** 0.5 for i in free]
        m = len(free)
        a = [
            [self.xtx[i][j] / (scale[r] * scale[c]) for c, j in enumerate(free)] + [self.xty[i] / scale[r]]
            for r, i in enumerate(free)
        ]
        for i in range(m):
            a[i][i] += 1e-9
        for col in range(m):
            pivot = max(range(col, m), key=lambda r: abs(a[r][col]))
            if abs(a[pivot][col]) < 1e-12:
                return None
            a[col], a[pivot] = a[pivot], a[col]
            for r in range(m):
                if r != col:
                    f = a[r][col] / a[col][col]
                    a[r] = [v - f * w for v, w in zip(a[r], a[col], strict=True)]
        return {i: a[r][m] / a[r][r] / scale[r] for r, i in enumerate(free)}


class StepCostModel:
    """How long a step takes, learned from measured steps, and the step-time target.

    The language model's time is fitted as a + b * tokens + c * attention pairs + d * scored tokens
    (a per-step overhead, a cost per token for the dense layers, one per (query, key) pair for
    attention, which dominates long prompts, and one per prompt token whose log-probabilities are
    asked for: an lm_head row over the whole vocabulary, its softmax and top-k); the vision tower's
    as seconds per tile.

    While sequences decode, a step that carries prefill or vision work is held near the target: a
    fixed one when `target_s` is set, else `stall_factor` times what recent decode-only steps took
    (measured, not fitted: that is what the streams see between two tokens), but never less than
    `floor_s`. So running streams slow down by a bounded factor, whatever the
    model and the device, while new prompts still progress at least `min_tokens` and one tile a step.
    With nothing decoding, a step is held near `idle_target_s` (or the fixed target): short enough
    that a new request soon joins, long enough that the per-step overhead stays small.
    """

    def __init__(
        self,
        target_s: float | None,
        *,
        max_tokens: int,
        max_tiles: int,
        floor_s: float = 0.1,
        idle_target_s: float = 0.25,
        stall_factor: float = 3.0,
        min_tokens: int = 16,
        initial: tuple[float, float, float, float] = (0.005, 1e-3, 1e-7, 1e-4),
        initial_tile_s: float = 0.05,
    ) -> None:
        self.fixed_target_s = target_s
        self.floor_s = floor_s
        self.idle_s = idle_target_s
        self.stall_factor = stall_factor
        self.max_tokens = max_tokens
        self.max_tiles = max_tiles
        self.min_tokens = min_tokens
        self._lm = _LeastSquares(4)
        self._initial = initial
        self._tile_s: float | None = None
        self._initial_tile_s = initial_tile_s
        # Recent decode-only step durations, by number of decodes (rounded up to a power of two).
        self._quiet: dict[int, deque[float]] = {}

    def observe_lm(self, tokens: int, pairs: int, seconds: float, scored: int = 0) -> None:
        """A forward of `tokens` tokens and `pairs` attention pairs, `scored` of whose tokens had
        their prompt log-probabilities computed and converted, took `seconds`."""
        if tokens > 0 and seconds > 0:
            self._lm.add([1.0, float(tokens), float(pairs), float(scored)], seconds)

    def observe_step(self, decodes: int, decode_only: bool, seconds: float) -> None:
        """A whole step's duration (vision, forward and sampling); decode-only ones set the pace."""
        if decode_only and decodes > 0 and seconds > 0:
            self._quiet.setdefault(_bucket(decodes), deque(maxlen=16)).append(seconds)

    def observe_vision(self, tiles: float, seconds: float) -> None:
        if tiles > 0 and seconds > 0:
            per_tile = seconds / tiles
            self._tile_s = per_tile if self._tile_s is None else 0.8 * self._tile_s + 0.2 * per_tile

    def _weights(self) -> tuple[float, float, float, float]:
        fitted = self._lm.weights()
        if fitted is None or fitted[1] + fitted[2] <= 0:  # no per-token cost learned yet
            return self._initial
        score = fitted[3] if self._lm.seen(3) else self._initial[3]
        return fitted[0], fitted[1], fitted[2], score

    def lm_seconds(self, tokens: int, pairs: int, scored: int = 0) -> float:
        a, b, c, d = self._weights()
        return a + b * tokens + c * pairs + d * scored

    def chunk_seconds(self, start: int, end: int, scored: bool) -> float:
        """What a prompt chunk [start, end) adds to a step (the per-step overhead excluded)."""
        _, b, c, d = self._weights()
        return (b + (d if scored else 0.0)) * (end - start) + c * attention_pairs(start, end)

    @property
    def tile_seconds(self) -> float:
        return self._tile_s if self._tile_s is not None else self._initial_tile_s

    def quiet_s(self, decodes: int) -> float | None:
        """The median of recent decode-only steps with about as many decodes: what the streams see
        between two tokens when nothing else runs (a median: the odd slow step does not move it)."""
        bucket = _bucket(decodes)
        known = sorted(self._quiet, key=lambda b: (b > bucket, abs(b - bucket)))  # this, smaller, larger
        return statistics.median(self._quiet[known[0]]) if known else None

    def target_s(self, decode_s: float) -> float:
        """The step-time target for a step whose decodes alone take `decode_s`."""
        if self.fixed_target_s is not None:
            return self.fixed_target_s
        return max(self.floor_s, self.stall_factor * decode_s)

    @property
    def idle_target_s(self) -> float:
        """The step-time target for a step in which nothing decodes."""
        return self.fixed_target_s if self.fixed_target_s is not None else self.idle_s

    def affordable_tokens(self, seconds: float, position: int, scored: bool = False) -> int:
        """How many prompt tokens from `position` on fit in `seconds` (the marginal cost only);
        `scored`: their prompt log-probabilities are computed too."""
        if seconds <= 0:
            return 0
        _, b, c, d = self._weights()
        if scored:
            b += d
        # b x + c x (2 position + x + 1) / 2 <= seconds, solved for x
        qa, qb = c / 2, b + c * (position + 0.5)
        if qa <= 0:
            return int(seconds / qb) if qb > 0 else self.max_tokens
        return max(0, int((-qb + (qb * qb + 4 * qa * seconds) ** 0.5) / (2 * qa)))


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
        vision_stages: int = 1,
        vision_stage_shares: tuple[float, ...] | None = None,
    ) -> None:
        self.kv = kv
        self.vision_stages = vision_stages  # a tile's vision work can be cut into this many slices
        # Each slice's share of a tile's time (uneven: a ViT layer costs several times the patch
        # embedding); None: equal shares.
        self.vision_stage_shares = vision_stage_shares
        self.cost = cost
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.max_waiting = max_waiting
        self.reserve_blocks = reserve_blocks
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order; the last is preempted first
        self.num_preemptions = 0
        # Counted once per request, at its first admission (vLLM's prefix_cache_queries / _hits).
        self.prefix_cache_queries = 0  # prompt tokens looked up
        self.prefix_cache_hits = 0  # of which the cache held

    # -- admission control -----------------------------------------------------------------------

    def check_fits(self, prompt_len: int, max_tokens: int | None, image_tokens: int = 0, n: int = 1) -> int:
        """Return the effective max_tokens, or raise PromptTooLongError naming both numbers.

        The `n` choices must also fit the KV cache together, each at its full length: a request
        preempted after its choices diverged is recomputed choice by choice, and one that could not
        be admitted again would wait forever.
        """
        if max_tokens is None:
            if prompt_len >= self.max_model_len:
                raise PromptTooLongError(self._too_long(prompt_len, image_tokens, None), param="messages")
            max_tokens = self.max_model_len - prompt_len
        elif prompt_len + max_tokens > self.max_model_len:
            raise PromptTooLongError(self._too_long(prompt_len, image_tokens, max_tokens), param="messages")
        blocks = n * self.kv.blocks_for(prompt_len + max_tokens)
        if n > 1 and blocks > self.kv.pool.num_usable:
            capacity = self.kv.pool.num_usable * self.kv.block_size
            raise InvalidRequestError(
                f"n={n} choices of up to {prompt_len + max_tokens} tokens each need "
                f"{n * (prompt_len + max_tokens)} tokens of KV cache, more than the {capacity} it holds; "
                "lower n or max_tokens",
                param="n",
            )
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
        budget = _Budget(
            tokens=self.max_num_batched_tokens - len(plan.chunks),
            tiles=self.cost.max_tiles,
            seconds=self.cost.idle_target_s,
        )
        if plan.chunks:
            decodes = len(plan.chunks)
            decode_s = self.cost.quiet_s(decodes) or self.cost.lm_seconds(
                decodes, sum(c.end for c in plan.chunks)
            )
            budget.seconds = self.cost.target_s(decode_s) - decode_s
        planned: dict[int, int] = {}  # id(image) -> tiles_ready after this step's vision work
        held_tokens, held_seconds = self._hold_for_waiting(budget)
        for request in self.running:
            for seq in request.active_seqs():
                if seq.num_pending > 1 and not budget.spent:
                    self._schedule_prefill(plan, seq, budget, planned)
        budget.tokens += held_tokens
        budget.seconds += held_seconds
        while self.waiting and not budget.spent:
            request = self.waiting[0]
            first = request.first_scheduled_time is None
            if not self._admit(request):
                break
            self.waiting.popleft()
            self.running.append(request)
            if first:
                plan.admitted.append(request)
            for seq in request.active_seqs():
                self._schedule_prefill(plan, seq, budget, planned)
        return plan

    def _hold_for_waiting(self, budget: _Budget) -> tuple[int, float]:
        """Take out of the budget, before prompts being prefilled spend it, what the first waiting
        request's prompt needs (at most half): without it, a short request would wait behind every
        step of a long prompt. Nothing is held when it could not be admitted anyway."""
        if not self.waiting or not any(s.num_pending > 1 for r in self.running for s in r.active_seqs()):
            return 0, 0.0
        head = self.waiting[0]
        seqs = head.active_seqs()
        if not self._has_seats(head):
            return 0, 0.0
        need = sum(self.kv.blocks_for(s.num_tokens) - len(s.block_table) for s in seqs)
        if need + self.reserve_blocks > self.kv.pool.num_free:  # without counting prefix-cache hits
            return 0, 0.0
        tokens = max(0, min(budget.tokens // 2, max(s.num_tokens - s.num_computed for s in seqs)))
        seconds = 0.0
        if tokens > 0:
            tiles = sum(image.num_tiles - image.tiles_ready for image in head.images)
            scored = head.scores_prompt
            needed = self.cost.chunk_seconds(0, tokens, scored) + tiles * self.cost.tile_seconds
            seconds = max(0.0, min(budget.seconds / 2, needed))  # nothing to hold of an overrun
        budget.tokens -= tokens
        budget.seconds -= seconds
        return tokens, seconds

    def _schedule_decodes(self, plan: StepPlan) -> None:
        copies: list[tuple[int, int, Request]] = []
        for request in list(self.running):
            if request not in self.running or request.paused:  # preempted below; or its client is behind
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

    def _has_seats(self, request: Request) -> bool:
        """Whether its choices fit beside the running sequences (max_num_seqs)."""
        return sum(len(r.active_seqs()) for r in self.running) + request.n <= self.max_num_seqs

    def _admit(self, request: Request) -> bool:
        """Give the request's computing sequences blocks for all their tokens, taking what the
        prefix cache holds; False (nothing held) if that would leave less than the reserve free."""
        if not self._has_seats(request):
            return False
        seqs = request.active_seqs()
        cached = [self.kv.match_prefix(seq) for seq in seqs]
        first = request.first_scheduled_time is None
        # Looked up before allocating, which may evict that block.
        recomputed = self.kv.recomputed_tail(seqs[0], cached[0]) if first else 0
        need = sum(self.kv.blocks_for(s.num_tokens) - len(s.block_table) for s in seqs)
        # The reserve keeps room for running sequences to grow; with none running it would only
        # keep out a request that fits the whole cache.
        reserve = self.reserve_blocks if self.running else 0
        if need + reserve > self.kv.pool.num_free:
            for seq in seqs:
                self.kv.free(seq)
            return False
        for seq, hit in zip(seqs, cached, strict=True):
            growth = request.max_tokens - len(seq.output_ids)
            assert self.kv.allocate(seq, seq.num_tokens, growth=growth)
            seq.num_computed = hit
            seq.status = Status.RUNNING
        if first:
            request.first_scheduled_time = time.monotonic()
            request.num_cached_tokens = cached[0]
            request.num_recomputed_tokens = recomputed
            if self.kv.prefix_caching:
                self.prefix_cache_queries += request.prompt_len
                self.prefix_cache_hits += cached[0]
        return True

    def _schedule_prefill(
        self, plan: StepPlan, seq: Sequence, budget: _Budget, planned: dict[int, int]
    ) -> None:
        """Plan vision work and a prompt chunk for seq within the budget. The first prompt a step
        serves gets at least one tile or `min_tokens` tokens, whatever the target: prompts always
        progress, and a step overruns its target by at most that much."""
        start = seq.num_computed
        limit = seq.num_tokens
        cost = self.cost
        first = not plan.vision and not budget.prefilled
        for image in seq.request.images:
            if image.end <= start or image.start >= limit:
                continue
            ready = self._plan_vision(plan, image, budget, planned, first)
            first = first and not plan.vision
            if ready < image.num_tiles:
                limit = min(limit, image.start + ready * (image.num_tokens // image.num_tiles))
                break
        scored = seq.request.scores_prompt
        floor = self.cost.min_tokens if first else 0
        tokens = min(budget.tokens, max(floor, cost.affordable_tokens(budget.seconds, start, scored)))
        end = min(limit, start + tokens)
        if end > start:
            plan.chunks.append(Chunk(seq, start, end))
            budget.tokens -= end - start
            budget.prefilled = True
            budget.seconds -= cost.chunk_seconds(start, end, scored)

    def _plan_vision(
        self, plan: StepPlan, image: ImageSlot, budget: _Budget, planned: dict[int, int], first: bool
    ) -> int:
        """Plan what this step encodes of `image`; return its tiles ready after the step.

        `planned` maps images planned earlier in this step to their tiles ready after it, or to -1
        while a tile of theirs is left half-encoded (nothing more can be planned for them)."""
        if id(image) in planned:
            done = planned[id(image)]
            return image.tiles_ready if done < 0 else done
        ready, stage = image.tiles_ready, image.stage
        tile_s = self.cost.tile_seconds
        stage_s = self._stage_seconds(tile_s)
        if ready < image.num_tiles and budget.tiles > 0 and stage > 0:  # finish the tile in progress
            left = self.vision_stages - stage
            take = min(left, max(_stages_within(stage_s, stage, budget.seconds), 1 if first else 0))
            if take > 0:
                plan.vision.append(VisionTask(image, ready, ready + 1, (stage, stage + take)))
                budget.seconds -= sum(stage_s[stage : stage + take])
                first = False
                if take == left:
                    ready, stage = ready + 1, 0
                    budget.tiles -= 1
                else:
                    planned[id(image)] = -1
                    return ready
        if ready < image.num_tiles and budget.tiles > 0 and stage == 0:
            want = image.num_tiles - ready
            take = min(want, budget.tiles, int(budget.seconds / tile_s))
            if take > 0:
                plan.vision.append(VisionTask(image, ready, ready + take))
                budget.tiles -= take
                budget.seconds -= take * tile_s
                ready += take
            elif first:  # not even one tile fits: a slice of one, so the image still progresses
                part = max(1, min(self.vision_stages - 1, _stages_within(stage_s, 0, budget.seconds)))
                plan.vision.append(VisionTask(image, ready, ready + 1, (0, part)))
                budget.seconds -= sum(stage_s[:part])
                planned[id(image)] = -1
                return ready
        planned[id(image)] = ready
        return ready

    def _stage_seconds(self, tile_s: float) -> list[float]:
        """Seconds of each vision slice of one tile."""
        shares = self.vision_stage_shares
        if shares is None:
            return [tile_s / self.vision_stages] * self.vision_stages
        assert len(shares) == self.vision_stages, "one share per vision stage"
        total = sum(shares)
        return [tile_s * share / total for share in shares]

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
        """Whether a step could do anything (paused requests wait for their clients, not for steps)."""
        return bool(self.waiting) or any(not r.paused for r in self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)


def _stages_within(stage_s: list[float], first: int, seconds: float) -> int:
    """How many slices from `first` on fit in `seconds`."""
    count = 0
    for cost in stage_s[first:]:
        if cost > seconds:
            break
        seconds -= cost
        count += 1
    return count
