"""Grammar masks in the batched sampler: constrained and free sequences share one batch.

Each constrained sequence carries an llguidance matcher (built by the processor from its
request's Constraint). Before a step samples, the masks of all its constrained rows are computed
together by llguidance's executor, on its own threads and without the GIL, into one packed bitmask
(32 tokens per int32); the bits are unpacked on the logits' device and disallowed tokens set to
-inf. After sampling, each matcher consumes its token; a matcher that has nothing more to accept
ends its sequence with "stop".
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch
from llguidance import LLExecutor, LLMatcher

from model_runtime.engine.sequence import Sequence


class GuidedDecoding:
    """Masks logits rows by their sequences' grammars, and advances the grammars."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        self._executor: LLExecutor | None = None  # threads start on the first constrained request
        self._bits = torch.arange(32, dtype=torch.int32)

    def apply(self, seqs: Seq[Sequence], logits: torch.Tensor) -> list[tuple[Sequence, str]]:
        """Set each constrained row's disallowed logits to -inf, in place. Returns the sequences
        whose grammar failed (their rows are left unmasked, so sampling stays defined; the caller
        fails their requests)."""
        guided = [(row, seq.matcher) for row, seq in enumerate(seqs) if seq.matcher is not None]
        if not guided:
            return []
        if self._executor is None:
            self._executor = LLExecutor()
        bitmask = torch.zeros((len(guided), self.words), dtype=torch.int32)
        self._executor.unsafe_compute_mask_ptr(
            [(matcher, index) for index, (_, matcher) in enumerate(guided)],
            bitmask.data_ptr(),
            self.words * 4,
            len(guided),
        )
        failed: list[tuple[Sequence, str]] = []
        for index, (row, matcher) in enumerate(guided):
            if matcher.is_error():
                failed.append((seqs[row], matcher.get_error()))
                bitmask[index] = -1
        allowed = (bitmask.unsqueeze(-1) >> self._bits) & 1  # [G, W, 32]
        allowed = allowed.view(len(guided), -1)[:, : logits.shape[-1]].bool().to(logits.device)
        rows = torch.tensor([row for row, _ in guided], device=logits.device)
        logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
        return failed

    @staticmethod
    def advance(matcher: LLMatcher, token: int) -> str | None:
        """Feed the sampled token; "stop" when the grammar is complete, "error" if it was refused."""
        if not matcher.consume_token(token):
            return "error"
        return "stop" if matcher.is_stopped() else None
