"""Resize the top of a JPEG while Pillow is still decoding the bottom.

Why: on a 4000x3000 photo the decode takes 40-70 ms of one core, during which the other cores sit
idle waiting for pixels that the horizontal resize pass could already use (it needs only the rows
it resizes). Letting the resize start on finished rows hides much of the decode.

How, using only public Pillow behaviour:
- Pillow decodes into the image's memory if the image already has some when load() starts, so the
  caller assigns `image.im = canvas.im`, where canvas is a new RGB image of the same size, which
  other threads can read with `canvas.crop()` at any time (they could not use the image being
  loaded: its methods would start a second load). DecodedRows paints the few pixels it probes
  black first, so whatever else the new memory holds does not matter.
- ImageFile.load() reads the file in blocks between decoder calls. The file object is a
  ProbingReader, which calls a hook at each read, on the decoding thread, while the decoder is
  between calls: DecodedRows then finds the lowest row that is no longer black. A JPEG decoder
  writes whole rows, top to bottom, once each, so every row above a non-black one is final.
  A genuinely black row can only make it report fewer rows than are done, never more.
- After load(), the caller checks that the decoded pixels really are the canvas's
  (`image.im is canvas.im`); if a future Pillow decodes elsewhere, it must redo the work from the
  decoded image. tests/test_jpeg_stream.py compares this path with the reference on baseline,
  progressive, restart-marker and subsampled JPEGs.
"""

from __future__ import annotations

import io
from collections.abc import Callable

from PIL import Image


class ProbingReader(io.BytesIO):
    """BytesIO whose read() first calls `on_read` (when set): Pillow's decoder is idle at that moment."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.on_read: Callable[[], None] | None = None

    def read(self, size: int | None = -1) -> bytes:
        if self.on_read is not None:
            self.on_read()
        return super().read(size)


class DecodedRows:
    """How many top rows of `canvas` a top-down decoder has finished, judged from its pixels.

    Call update() only from the decoding thread while the decoder is between calls.
    """

    def __init__(self, canvas: Image.Image) -> None:
        self.height = canvas.height
        self.rows = 0
        self._pixels = canvas.load()
        self._xs = sorted({canvas.width - 1, canvas.width // 2, 0})
        for x in self._xs:  # the only pixels read before the decoder writes them
            canvas.paste((0, 0, 0), (x, 0, x + 1, canvas.height))

    def _written(self, y: int) -> bool:
        pixels = self._pixels
        return any(pixels[x, y] != (0, 0, 0) for x in self._xs)

    def update(self) -> int:
        """Advance `rows` past every row now known to be final; returns it."""
        # Samples at growing distances find the highest written row cheaply even past a black band
        # (a letterbox bar), then a row-by-row walk settles the exact edge.
        done = self.rows - 1
        step = 1
        while self.rows - 1 + step < self.height:
            if self._written(self.rows - 1 + step):
                done = self.rows - 1 + step
            step *= 2
        y = done + 1
        while y < self.height and self._written(y):
            y += 1
        self.rows = max(self.rows, y)
        return self.rows
