"""Large JPEGs resized while they decode (model_runtime/jpeg_stream.py): same tensors as the reference."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFile

from model_runtime import jpeg_stream
from model_runtime.errors import MediaError
from model_runtime.preprocess import STREAM_MIN_PIXELS, load_image
from tests.reference import ref_load_image

SIZE = (2400, 1000)  # 2.4 MP: over STREAM_MIN_PIXELS, small enough for a quick test


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth colour ramps plus noise: compresses like a photo, no row is black."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], axis=-1)
    return np.clip(base + rng.integers(-20, 21, size=(height, width, 3)), 1, 255).astype(np.uint8)


def jpeg(pixels: np.ndarray, **options) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90, **options)
    return out.getvalue()


def assert_same(ours, ref) -> None:
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() == 0


@pytest.mark.parametrize(
    "options",
    [
        {},  # baseline, 4:2:0
        {"subsampling": 0},  # 4:4:4
        {"subsampling": 1},  # 4:2:2
        {"progressive": True},  # every row arrives at the very end
        {"optimize": True},
        {"restart_marker_rows": 1},
    ],
    ids=["baseline", "444", "422", "progressive", "optimized", "restart-markers"],
)
def test_streamed_jpeg_equals_reference(options) -> None:
    data = jpeg(photo(*SIZE), **options)
    assert_same(load_image(data, parallel=True), ref_load_image(data))


def test_black_bands_and_black_images() -> None:
    letterbox = photo(*SIZE)
    letterbox[:300] = 0  # a black bar over the first 300 rows, then one in the middle
    letterbox[500:520] = 0
    for pixels in (letterbox, np.zeros((SIZE[1], SIZE[0], 3), np.uint8)):
        data = jpeg(pixels)
        assert_same(load_image(data, parallel=True), ref_load_image(data))


def test_rows_are_released_while_the_image_decodes(monkeypatch) -> None:
    seen: list[int] = []
    update = jpeg_stream.DecodedRows.update

    def spy(self) -> int:
        seen.append(update(self))
        return seen[-1]

    monkeypatch.setattr(jpeg_stream.DecodedRows, "update", spy)
    data = jpeg(photo(*SIZE))
    assert_same(load_image(data, parallel=True), ref_load_image(data))
    # Pillow reads the file block by block: strips of finished rows went out before the last row.
    assert any(0 < rows < SIZE[1] for rows in seen), seen
    assert seen == sorted(seen)


def test_a_pillow_that_decodes_into_its_own_memory_still_gives_the_reference(monkeypatch) -> None:
    def own_memory(self) -> None:
        self.im = Image.core.new(self.mode, self.size)

    monkeypatch.setattr(ImageFile.ImageFile, "load_prepare", own_memory)
    data = jpeg(photo(*SIZE))
    assert_same(load_image(data, parallel=True), ref_load_image(data))


def test_truncated_jpeg_is_a_media_error() -> None:
    data = jpeg(photo(*SIZE))
    with pytest.raises(MediaError):
        load_image(data[: len(data) // 2], parallel=True)


def test_small_rotated_and_grey_jpegs_take_the_plain_path(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("streamed")

    monkeypatch.setattr(jpeg_stream, "DecodedRows", fail)
    small = photo(1000, 800)
    assert STREAM_MIN_PIXELS > 1000 * 800
    grey = jpeg(photo(*SIZE)[..., 0])
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: pixels change after decoding
    rotated = jpeg(photo(*SIZE), exif=exif.tobytes())
    for data in (jpeg(small), grey, rotated):
        load_image(data, parallel=True)


def test_decoded_rows_never_runs_ahead_of_the_decoder() -> None:
    canvas = Image.new("RGB", (64, 400), (200, 100, 50))  # memory not yet written holds anything
    rows = jpeg_stream.DecodedRows(canvas)
    assert rows.update() == 0
    canvas.paste((9, 9, 9), (0, 0, 64, 50))  # rows 0..49 written
    assert rows.update() == 50
    canvas.paste((0, 0, 0), (0, 50, 64, 150))  # black rows 50..149 written, then 150..199 in colour
    canvas.paste((1, 0, 0), (0, 150, 64, 200))
    assert rows.update() == 200  # a written row below proves the black ones above are final
    assert rows.update() == 200
    canvas.paste((5, 5, 5), (0, 200, 64, 400))
    assert rows.update() == 400


def test_concurrent_images_share_the_pool_without_mixing_pixels() -> None:
    # The server decodes several requests' images at once on its preprocessing threads, all sharing
    # one resize pool.
    from concurrent.futures import ThreadPoolExecutor

    payloads = [jpeg(photo(*SIZE, seed=s)) for s in range(3)] + [jpeg(photo(2000, 1100, seed=9))]
    expected = [ref_load_image(data) for data in payloads]
    with ThreadPoolExecutor(max_workers=4) as callers:
        results = list(callers.map(lambda d: load_image(d, parallel=True), payloads * 2))
    for got, want in zip(results, expected * 2, strict=True):
        assert_same(got, want)
