"""The scheduler: who waits, who runs, and what each step computes. Pure Python, no torch.

Memory is a fixed set of KV-cache slots, each holding up to `max_model_len` tokens, allocated up
front; admission reserves `n` slots per request, so admitted work can never run the device out of
memory. Decoding sequences occupy slots 0..D-1 in order, so the runner's decode batch is a plain
slice of the cache (no gather). When one finishes, the last decoder moves into its slot; the
scheduler reports such moves and the runner copies the cache rows.

Each step decodes every decoding sequence (one token each) and spends the rest of the token budget
on prefills, first-come first-served; a prompt longer than what is left is prefilled in chunks over
several steps while the others keep decoding. Only the newest admitted request may be mid-prefill.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from model_runtime.engine.sequence import Request, Sequence, Status
from model_runtime.errors import InvalidRequestError, PromptTooLongError, QueueFullError


@dataclass(frozen=True)
class PrefillChunk:
    """Prompt tokens [start, end) of `request` to compute this step, into its base slot."""

    request: Request
    start: int
    end: int

    @property
    def completes(self) -> bool:
        return self.end == self.request.prompt_len


@dataclass
class StepPlan:
    """What one engine step runs."""

    prefills: list[PrefillChunk] = field(default_factory=list)
    decodes: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.prefills and not self.decodes


SlotMove = tuple[int, int, int]  # (src slot, dst slot, tokens to copy)


class Scheduler:
    """Admission control, token budgets and slot bookkeeping."""

    def __init__(
        self, *, num_slots: int, max_num_batched_tokens: int, max_model_len: int, max_waiting: int
    ) -> None:
        if max_num_batched_tokens < num_slots:
            raise ValueError("max_num_batched_tokens must be at least the number of sequences per step")
        self.num_slots = num_slots
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.max_waiting = max_waiting
        self.waiting: deque[Request] = deque()
        self.decoding: list[Sequence] = []  # decoding[i].slot == i
        self.prefilling: list[Request] = []  # admitted, prompt not fully computed; slots after decoders

    # -- admission -------------------------------------------------------------------------------

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
        if request.n > self.num_slots:
            raise InvalidRequestError(
                f"n={request.n} exceeds the {self.num_slots} sequences this server runs at once", param="n"
            )
        if len(self.waiting) >= self.max_waiting:
            raise QueueFullError("the server is at capacity (waiting queue full); retry later")
        self.waiting.append(request)

    # -- planning --------------------------------------------------------------------------------

    @property
    def used_slots(self) -> int:
        return len(self.decoding) + sum(r.n for r in self.prefilling)

    def schedule(self) -> StepPlan:
        plan = StepPlan(decodes=list(self.decoding))
        budget = self.max_num_batched_tokens - len(plan.decodes)
        for request in self.prefilling:  # a request left mid-prefill by the previous step
            if budget <= 0:
                return plan
            end = min(request.prompt_len, request.num_computed + budget)
            plan.prefills.append(PrefillChunk(request, request.num_computed, end))
            budget -= end - request.num_computed
        next_slot = self.used_slots
        while self.waiting and budget > 0 and not self._partial_pending(plan):
            request = self.waiting[0]
            if next_slot + request.n > self.num_slots:
                break
            self.waiting.popleft()
            request.base_slot = next_slot
            request.first_scheduled_time = time.monotonic()
            for seq in request.seqs:
                seq.status = Status.PREFILLING
            self.prefilling.append(request)
            next_slot += request.n
            end = min(request.prompt_len, budget)
            plan.prefills.append(PrefillChunk(request, 0, end))
            budget -= end
        return plan

    @staticmethod
    def _partial_pending(plan: StepPlan) -> bool:
        return bool(plan.prefills) and not plan.prefills[-1].completes

    # -- results ---------------------------------------------------------------------------------

    def prefilled(self, chunk: PrefillChunk) -> None:
        """Record a computed chunk; a completed prompt turns its sequences into decoders."""
        request = chunk.request
        request.num_computed = chunk.end
        if not chunk.completes:
            return
        assert self.prefilling and self.prefilling[0] is request, "prefills complete in admission order"
        self.prefilling.pop(0)
        assert request.base_slot == len(self.decoding), "a completed prefill sits right after the decoders"
        for seq in request.seqs:
            seq.slot = len(self.decoding)
            seq.status = Status.DECODING
            self.decoding.append(seq)

    def finish(self, seq: Sequence, reason: str) -> list[SlotMove]:
        """Take a decoding sequence out; return the cache moves that keep slots contiguous."""
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        moves: list[SlotMove] = []
        if seq.slot < 0:
            return moves
        hole = seq.slot
        seq.slot = -1
        last = self.decoding.pop()
        if last is not seq:
            self.decoding[hole] = last
            moves.append((last.slot, hole, last.num_tokens))
            last.slot = hole
        for request in self.prefilling:  # shift mid-prefill prompts down by one slot
            moves.append((request.base_slot, request.base_slot - 1, request.num_computed))
            request.base_slot -= 1
        return moves

    def abort(self, request: Request, reason: str = "abort") -> list[SlotMove]:
        """Remove a request wherever it is; return cache moves for freed slots."""
        if request in self.waiting:
            self.waiting.remove(request)
        moves: list[SlotMove] = []
        if request in self.prefilling:
            index = self.prefilling.index(request)
            self.prefilling.pop(index)
            for later in self.prefilling[index:]:
                moves.append((later.base_slot, later.base_slot - request.n, later.num_computed))
                later.base_slot -= request.n
        for seq in request.seqs:
            if seq.status is Status.DECODING:
                moves.extend(self.finish(seq, reason))
            else:
                seq.status = Status.FINISHED
                seq.finish_reason = seq.finish_reason or reason
        return moves

    # -- introspection ---------------------------------------------------------------------------

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.decoding or self.prefilling)

    @property
    def num_running(self) -> int:
        return len({id(s.request) for s in self.decoding}) + len(self.prefilling)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def used_tokens(self) -> int:
        return sum(s.num_tokens for s in self.decoding) + sum(r.num_computed for r in self.prefilling)
