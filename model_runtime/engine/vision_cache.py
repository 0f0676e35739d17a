"""A content-addressed LRU cache of projected vision features, bounded in bytes.

A multi-turn chat re-sends the same image every turn and many users send the same image; encoding
it once saves the vision tower's work (the dominant prefill cost for small LLMs), and a hit found
before decoding saves the image decode and tiling too. The engine thread and the preprocessing
threads share it, hence the lock.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch


class VisionFeatureCache:
    """Maps an image's content key to its features [tiles * tokens_per_tile, hidden]."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        # get() alone (the engine thread's lookups before encoding), apart from the preprocessing
        # threads' peeks: the engine counts its multimodal-cache queries from these.
        self.lookups = 0
        self.lookup_hits = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> torch.Tensor | None:
        with self._lock:
            self.lookups += 1
            features = self._entries.get(key)
            if features is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            self.lookup_hits += 1
            return features

    def peek(self, key: str) -> torch.Tensor | None:
        """Like get, but a miss is not counted (the engine's lookup at prefill time counts it)."""
        with self._lock:
            features = self._entries.get(key)
            if features is not None:
                self._entries.move_to_end(key)
                self.hits += 1
            return features

    def put(self, key: str, features: torch.Tensor) -> None:
        size = features.numel() * features.element_size()
        with self._lock:
            if size > self.max_bytes or key in self._entries:
                return
            self._entries[key] = features
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self.bytes -= old.numel() * old.element_size()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)
