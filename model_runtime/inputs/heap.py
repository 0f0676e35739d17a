"""Giving freed memory back to the OS after large decodes.

glibc keeps the pages of freed heap blocks for reuse, so after a 50-megapixel image has been
decoded and tiled (hundreds of MB at its peak, all freed by the end) the process's RSS stays that
high. malloc_trim returns them; it costs about a millisecond, so it runs only after large media.
"""

from __future__ import annotations

import ctypes
import functools


def trim_heap() -> None:
    """Return freed heap memory to the OS (glibc's malloc_trim); a no-op elsewhere."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only (musl and macOS have none)
    except (OSError, AttributeError):
        return None
    return libc
