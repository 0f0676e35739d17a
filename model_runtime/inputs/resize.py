"""Pillow's bicubic resize, split into strips that run on several cores, with identical pixels.

Why: a 4000x3000 photo needs two resizes (the tile grid and the thumbnail) that cost ~170 ms of
single-core Pillow time, several times its JPEG decode. Pillow releases the GIL while it resamples, so
threads can share that work, but one `Image.resize` call runs on one core.

Why the pixels are identical: Pillow's resample is separable. It runs a horizontal pass (every row
to the new width) and a vertical pass (every column to the new height), one after the other with an
8-bit intermediate between them, in the order pass_order() states. The filter coefficients of each
pass depend only on that axis's old and new length, and each output value only on its own row
(horizontal pass) or column (vertical pass). So a band of rows resized to (new width, same height)
runs only the horizontal pass, with the same coefficients, and gives exactly those rows of that
pass's output; a band of columns resized to (same width, new height) likewise for the vertical pass.
tests/test_resize.py checks equality with `Image.resize` over many shapes and both pass orders, and
matches_pillow() repeats a small check once per process, so that a future Pillow that changes its
pass order turns the strips off (with a warning) instead of changing pixels.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from PIL import Image
from PIL import __version__ as _pillow_version

from model_runtime.cpu_threads import use_one_openmp_thread

BICUBIC = Image.Resampling.BICUBIC
PILLOW_VERSION = tuple(int(part) for part in _pillow_version.split(".")[:2])
# Below this many source pixels per strip, a thread hand-off costs more than the strip saves.
MIN_STRIP_PIXELS = 400_000
MEDIA_NICE = 10  # how much lower media threads run than the engine (see lower_priority)

log = logging.getLogger(__name__)

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def pool_size() -> int:
    """Threads the shared resize pool runs: one per core the process may use, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def lower_priority() -> None:
    """Run the calling thread at a lower OS priority (Linux: a per-thread nice value).

    Media work must not take CPU from the engine thread, whose steps the running streams wait on:
    at a lower priority it uses the cores the engine leaves idle and yields when it needs them.
    """
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or not permitted: keep the default
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), MEDIA_NICE)


def media_thread() -> None:
    """Initializer of the media threads: a lower OS priority, and torch run on the thread alone
    (model_runtime/cpu_threads.py: an OpenMP pool on any thread but the engine's slows its steps)."""
    lower_priority()
    use_one_openmp_thread()


def shared_pool() -> ThreadPoolExecutor:
    """One process-wide pool: every preprocessing thread shares it, so strips never outnumber cores."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(
                max_workers=pool_size(), thread_name_prefix="internvl-resize", initializer=media_thread
            )
        return _pool


def bands(length: int, parts: int, align: int = 1) -> list[tuple[int, int]]:
    """[start, end) ranges covering 0..length in at most `parts` nearly equal pieces, cut at
    multiples of `align` (the last piece takes what is left)."""
    units = -(-length // align)
    parts = max(1, min(parts, units))
    cuts = [min(length, (units * i // parts) * align) for i in range(parts + 1)]
    return [(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


def strip_count(image: Image.Image, workers: int, min_strip_pixels: int = MIN_STRIP_PIXELS) -> int:
    """How many strips a pass over this image is worth cutting into."""
    width, height = image.size
    return max(1, min(workers, width * height // min_strip_pixels))


def pass_order(source: tuple[int, int], target: tuple[int, int]) -> tuple[str, ...]:
    """The passes Image.resize runs for these sizes, in its order: "h" (horizontal), "v" (vertical).

    Pillow skips a pass whose axis keeps its length. Up to 12.x it always ran the horizontal pass
    first; 13.0 runs the vertical pass first when the height shrinks by more than twice as many
    pixels as the width. The order changes the rounding of the 8-bit intermediate, hence the pixels.
    """
    (src_w, src_h), (dst_w, dst_h) = source, target
    order = [axis for axis, needed in (("h", src_w != dst_w), ("v", src_h != dst_h)) if needed]
    shrink_h, shrink_w = src_h - dst_h, src_w - dst_w
    if len(order) == 2 and PILLOW_VERSION >= (13, 0) and shrink_h > 0 and shrink_h > 2 * shrink_w:
        order.reverse()
    return tuple(order)


def one_pass(image: Image.Image, axis: str, length: int, start: int, end: int) -> Image.Image:
    """Rows start..end (axis "h") or columns start..end (axis "v") of one pass of a resize that
    takes the image's width (h) or height (v) to `length`."""
    if axis == "h":
        return image.crop((0, start, image.width, end)).resize((length, end - start), BICUBIC)
    return image.crop((start, 0, end, image.height)).resize((end - start, length), BICUBIC)


Fill = Callable[[int, int, Image.Image], None]  # (left, top, strip of the resized image)


class StripResize:
    """One image.resize(size, BICUBIC) in flight on a pool, in strips.

    The first of two passes is queued when the object is made. finish() waits for that pass and
    queues the last one, whose strips are cut at multiples of `align` and handed to a callback on the
    pool thread that made them. Two resizes of one image can so keep every core busy: start both,
    then finish both.
    """

    def __init__(
        self,
        pool: ThreadPoolExecutor,
        image: Image.Image,
        size: tuple[int, int],
        workers: int,
        min_strip_pixels: int = MIN_STRIP_PIXELS,
    ) -> None:
        self.pool, self.size, self.workers = pool, size, workers
        self.min_strip_pixels = min_strip_pixels
        self.passes = pass_order(image.size, size)
        self.image = image
        self.first: list[Future[None]] = []
        # The first pass's output, filled in place by its strips, which cover all of it (so it is
        # not initialised). Allocated on the pool, queued before any strip, so it is running or
        # done by the time a strip waits for it.
        self._between: Future[Image.Image] | None = None
        if len(self.passes) == 2:
            parts = strip_count(image, workers, min_strip_pixels)
            between = (size[0], image.height) if self.passes[0] == "h" else (image.width, size[1])
            self._between = pool.submit(Image.new, image.mode, between, None)
            length = image.height if self.passes[0] == "h" else image.width
            self.first = [pool.submit(self._first_strip, a, b) for a, b in bands(length, parts)]

    def _first_strip(self, start: int, end: int) -> None:
        axis = self.passes[0]
        strip = one_pass(self.image, axis, self.size[0] if axis == "h" else self.size[1], start, end)
        assert self._between is not None
        self._between.result().paste(strip, (0, start) if axis == "h" else (start, 0))  # disjoint regions

    def finish(self, fill: Fill, align: int = 1) -> list[Future[None]]:
        """Queue the last pass; each of its strips goes to fill(left, top, strip). Returns its futures."""
        for future in self.first:
            future.result()
        image = self.image if self._between is None else self._between.result()
        axis = self.passes[-1] if self.passes else "h"

        def strip(start: int, end: int) -> None:
            if self.passes:
                pixels = one_pass(image, axis, self.size[0] if axis == "h" else self.size[1], start, end)
            else:  # nothing to resize: hand out the image itself in bands
                pixels = image.crop((0, start, image.width, end))
            fill(*((0, start) if axis == "h" else (start, 0)), pixels)

        cut = image.height if axis == "h" else image.width
        parts = strip_count(image, self.workers, self.min_strip_pixels)
        return [self.pool.submit(strip, a, b) for a, b in bands(cut, parts, align)]


def resize(
    image: Image.Image,
    size: tuple[int, int],
    pool: ThreadPoolExecutor | None = None,
    *,
    workers: int | None = None,
    min_strip_pixels: int = MIN_STRIP_PIXELS,
) -> Image.Image:
    """Equals image.resize(size, BICUBIC), computed in strips on the pool (the shared one by default)."""
    out = Image.new(image.mode, size)
    job = StripResize(pool or shared_pool(), image, size, workers or pool_size(), min_strip_pixels)
    for future in job.finish(lambda left, top, strip: out.paste(strip, (left, top))):
        future.result()
    return out


@functools.cache
def matches_pillow() -> bool:
    """Whether strips reproduce this Pillow's Image.resize exactly, checked once on noise images in
    both pass orders (about 10 ms). False turns the tiling's strip path off."""
    import numpy as np  # only here: the rest of this module needs no numpy

    noise = np.random.default_rng(0).integers(0, 256, size=(240, 320, 3), dtype=np.uint8)
    image = Image.fromarray(noise)
    with ThreadPoolExecutor(max_workers=2) as pool:
        for size in [(96, 96), (300, 60), (500, 400), (320, 100), (200, 240)]:
            strips = resize(image, size, pool, workers=3, min_strip_pixels=1)
            if strips.tobytes() != image.resize(size, BICUBIC).tobytes():
                log.warning(
                    "Pillow %s resizes differently from what model_runtime.inputs.resize expects; "
                    "image resizes run on one thread each",
                    _pillow_version,
                )
                return False
    return True
