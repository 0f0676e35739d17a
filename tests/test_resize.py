"""model_runtime.inputs.resize: strip-parallel bicubic resize gives exactly Image.resize's pixels."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from model_runtime.inputs import resize


def noisy_image(width: int, height: int, seed: int = 0) -> Image.Image:
    # Full-range noise: any rounding difference between the strip and whole-image paths shows.
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and a.mode == b.mode and np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    "source, target",
    [
        ((4000, 3000), (1792, 1344)),  # a 12 MP photo to a 4x3 grid
        ((4000, 3000), (448, 448)),  # ... and to its thumbnail
        ((640, 480), (1792, 1344)),  # upscaling
        ((1000, 7), (448, 448)),  # fewer rows than strips would like
        ((7, 1000), (448, 896)),
        ((1919, 1081), (1343, 895)),  # odd sizes on both sides
        ((900, 900), (900, 450)),  # width unchanged: vertical pass only
        ((900, 900), (450, 900)),  # height unchanged: horizontal pass only
        ((513, 257), (513, 257)),  # no change at all
        ((1, 1), (448, 448)),
    ],
)
def test_resize_in_strips_equals_image_resize(source: tuple[int, int], target: tuple[int, int]) -> None:
    image = noisy_image(*source)
    expected = image.resize(target, Image.Resampling.BICUBIC)
    with ThreadPoolExecutor(max_workers=3) as pool:
        assert same_pixels(resize.resize(image, target, pool), expected)
    assert same_pixels(resize.resize(image, target), expected)  # the shared pool


@pytest.mark.parametrize("workers", [1, 2, 3, 5, 16])
def test_any_number_of_strips_gives_the_same_pixels(workers: int) -> None:
    image = noisy_image(1500, 1100, seed=workers)
    for target in [(672, 448), (1400, 300)]:  # horizontal pass first / vertical pass first (Pillow 13)
        expected = image.resize(target, Image.Resampling.BICUBIC)
        out = Image.new("RGB", target)
        with ThreadPoolExecutor(max_workers=2) as pool:
            job = resize.StripResize(pool, image, target, workers, min_strip_pixels=1)
            for future in job.finish(
                lambda left, top, strip, out=out: out.paste(strip, (left, top)), align=7
            ):
                future.result()
        assert same_pixels(out, expected)


def test_pass_order_follows_pillow() -> None:
    assert resize.pass_order((100, 100), (100, 100)) == ()
    assert resize.pass_order((100, 100), (50, 100)) == ("h",)
    assert resize.pass_order((100, 100), (100, 50)) == ("v",)
    assert resize.pass_order((4000, 3000), (1792, 1344)) == ("h", "v")
    vertical_first = ("v", "h") if resize.PILLOW_VERSION >= (13, 0) else ("h", "v")
    assert resize.pass_order((7, 1000), (448, 896)) == vertical_first
    assert resize.pass_order((1000, 1000), (900, 700)) == vertical_first  # 300 > 2 * 100


def test_bands_cover_the_length_at_aligned_cuts() -> None:
    assert resize.bands(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert resize.bands(1792, 3, align=448) == [(0, 448), (448, 896), (896, 1792)]
    assert resize.bands(448, 4, align=448) == [(0, 448)]  # one tile column cannot be cut
    assert resize.bands(5, 8) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    assert resize.bands(1000, 2, align=448) == [(0, 448), (448, 1000)]


def test_small_images_are_not_cut() -> None:
    assert resize.strip_count(noisy_image(64, 64), workers=8) == 1
    assert resize.strip_count(noisy_image(4000, 3000), workers=2) == 2


def test_strips_match_this_pillow() -> None:
    # The once-per-process check that keeps the tiling's strip path on.
    assert resize.matches_pillow()


@pytest.mark.skipif(resize.PILLOW_VERSION < (13, 0), reason="one pass order before Pillow 13")
def test_the_check_catches_a_wrong_pass_order(monkeypatch: pytest.MonkeyPatch) -> None:
    def horizontal_first(source: tuple[int, int], target: tuple[int, int]) -> tuple[str, ...]:
        return tuple(a for a, n in (("h", source[0] != target[0]), ("v", source[1] != target[1])) if n)

    monkeypatch.setattr(resize, "pass_order", horizontal_first)
    resize.matches_pillow.cache_clear()
    try:
        assert not resize.matches_pillow()
    finally:
        resize.matches_pillow.cache_clear()
