"""Incremental, UTF-8-safe detokenization and stop strings.

`IncrementalDetokenizer` turns one generated token id at a time into the text that is final, in the
style of TGI's prefix/read offsets: it decodes a short window of recent ids twice (with and without
the new ones) and emits the difference, holding back a trailing U+FFFD, which is what a byte-level
BPE decode shows while a multi-byte character is still split over tokens.

`StopChecker` sits behind it and never emits any part of a stop string: it holds back the longest
tail of the pending text that could still grow into one.

Concatenating every `step()` and the final `flush()` gives
`tokenizer.decode(output_ids, skip_special_tokens=...)` cut before the stop string that completes
first. Nothing is stripped: the model card's `chat()` returns `answer.strip()`, a streaming server
cannot strip leading whitespace it has already sent, so whether non-streaming responses strip is
for the caller to decide.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

_REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    """What both transformers tokenizers and `tokenizers.Tokenizer` provide."""

    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class StopChecker:
    """Cuts a stream of text before the first stop string, never emitting any part of one.

    A stop string counts from the moment it is complete; when several complete within the same
    push, the one that ends first wins (what character-by-character checking would give), so the
    result does not depend on how the text was split into pushes.
    """

    def __init__(self, stop_strings: Sequence[str]) -> None:
        assert all(stop_strings), "stop strings are non-empty (validated in SamplingParams)"
        self.stop_strings = tuple(stop_strings)
        self._pending = ""
        self.stopped = False
        self.matched: str | None = None

    def push(self, text: str) -> str:
        """Add text; return the part of the pending text that can no longer start a stop string."""
        if self.stopped:
            return ""
        pending = self._pending + text
        if not self.stop_strings:
            return pending
        hit = self._first_complete(pending)
        if hit is not None:
            start, stop = hit
            self.stopped, self.matched, self._pending = True, stop, ""
            return pending[:start]
        keep = self._partial_tail(pending)
        self._pending = pending[len(pending) - keep :]
        return pending[: len(pending) - keep]

    def flush(self) -> str:
        """The held-back tail at the end of generation: it never became a stop string, so it is text."""
        tail, self._pending = self._pending, ""
        return "" if self.stopped else tail

    def _first_complete(self, pending: str) -> tuple[int, str] | None:
        best: tuple[int, int, str] | None = None  # (end, start, stop string)
        for stop in self.stop_strings:
            start = pending.find(stop)
            if start < 0:
                continue
            # Earliest end first; on a tie the longer string, which starts earlier.
            candidate = (start + len(stop), start, stop)
            if best is None or candidate[:2] < best[:2]:
                best = candidate
        return None if best is None else (best[1], best[2])

    def _partial_tail(self, pending: str) -> int:
        """Length of the longest suffix of `pending` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stop_strings:
            for k in range(min(len(stop) - 1, len(pending)), longest, -1):
                if pending.endswith(stop[:k]):
                    longest = k
                    break
        return longest


class IncrementalDetokenizer:
    """Streams final text for generated token ids; see the module docstring for the guarantees.

    `prompt_ids_tail` (the last few prompt ids) seeds the decode window so that tokenizers whose
    decoding depends on the previous token (SentencePiece's leading "▁" is dropped at the start of
    a decode) render the first generated token as it reads after the prompt. Leave it None to get
    exactly `decode(output_ids)`, which is what byte-level BPE tokenizers (Qwen2) give either way.
    """

    def __init__(
        self,
        tokenizer: Decoder,
        prompt_ids_tail: Sequence[int] | None = None,
        *,
        skip_special_tokens: bool = True,
        stop_strings: Sequence[str] = (),
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = list(prompt_ids_tail or ())
        # ids[prefix:read] is text already emitted (or the prompt tail), kept as left context;
        # ids[read:] is not yet emitted.
        self._prefix = 0
        self._read = len(self._ids)
        self._stop = StopChecker(stop_strings)

    @property
    def stopped(self) -> bool:
        """A stop string appeared; the engine should finish the sequence with finish_reason "stop"."""
        return self._stop.stopped

    @property
    def matched_stop(self) -> str | None:
        return self._stop.matched

    def step(self, token_id: int) -> str:
        """Add one generated id; return the newly final text (often "")."""
        if self._stop.stopped:
            return ""
        self._ids.append(token_id)
        return self._stop.push(self._advance(final=False))

    def flush(self) -> str:
        """At the end of generation: everything still held back, unless a stop string cut it."""
        if self._stop.stopped:
            return ""
        text = self._stop.push(self._advance(final=True))
        return text + self._stop.flush()

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def _advance(self, *, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        if not final and (len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT)):
            # A character still split over tokens (or nothing printable yet): wait for more ids.
            return ""
        # The window starts and ends on character boundaries (it was emitted without a trailing
        # U+FFFD), so prefix_text is a prefix of new_text for byte-level and SentencePiece decoders.
        delta = new_text[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        return delta
