"""model_runtime.inputs (tiling, image, video) against a restatement of InternVL's reference preprocessing."""

from __future__ import annotations

import functools
import io
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import GifImagePlugin, Image, ImageOps

from model_runtime.errors import InvalidRequestError, MediaError, MediaTooLargeError
from model_runtime.inputs.image import decode_image, load_image, preprocess_image
from model_runtime.inputs.tiling import (
    candidate_grids,
    choose_grid,
    dynamic_preprocess,
    find_closest_aspect_ratio,
    tiles_to_tensor,
)
from model_runtime.inputs.video import get_index, load_video, probe_video
from tests.reference import (
    ref_dynamic_preprocess,
    ref_find_closest_aspect_ratio,
    ref_get_index,
    ref_load_image,
    ref_load_video,
    ref_pixels,
    ref_target_ratios,
    ref_transform,
)

# --- helpers -------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """These tests check equality, not speed: one intra-op thread keeps the many small per-tile torch
    ops of the reference from spin-waiting on a busy machine (it doubles CPU time on two cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=8)
def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A seeded gradient + noise image (cached: callers never modify it)."""
    rng = np.random.default_rng(seed)
    xx = (np.arange(width, dtype=np.int16) * 255 // max(width, 1))[None, :]
    yy = (np.arange(height, dtype=np.int16) * 255 // max(height, 1))[:, None]
    base = np.stack(np.broadcast_arrays(xx, yy, (xx + yy) // 2), axis=-1)
    noise = rng.integers(-40, 41, size=base.shape, dtype=np.int16)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def assert_same(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    assert torch.equal(ours, ref), f"max abs diff {(ours - ref).abs().max().item()}"


def assert_safe_message(exc: BaseException) -> None:
    message = str(exc)
    assert message and "0x" not in message and "/" not in message and "BytesIO" not in message


# --- tiling parity -------------------------------------------------------------------------------

SMALL = [(1, 1), (3, 5), (13, 7), (448, 448), (500, 500)]
LARGE = [(300, 1800), (1800, 300), (1920, 1080), (600, 900), (1080, 1920)]
TILINGS = [(1, 1), (1, 6), (1, 12), (2, 6), (4, 12)]
PARITY_CASES = [(size, tiling) for size in SMALL for tiling in TILINGS] + [
    (size, tiling) for size in LARGE for tiling in [(1, 12), (2, 6)]
]


@pytest.mark.parametrize(("size", "tiling"), PARITY_CASES)
def test_preprocess_image_equals_reference(size, tiling):
    min_tiles, max_tiles = tiling
    image = noise_image(*size)
    ref = ref_pixels(image, max_num=max_tiles, min_num=min_tiles)
    assert_same(preprocess_image(image, max_tiles=max_tiles, min_tiles=min_tiles), ref)
    # Strip-parallel resizes; the tall ones run Pillow 13's vertical-first order.
    assert_same(preprocess_image(image, max_tiles=max_tiles, min_tiles=min_tiles, parallel=True), ref)


@pytest.mark.parametrize(
    ("size", "tiling"), [((13, 7), (1, 12)), ((1800, 300), (1, 6)), ((600, 900), (2, 6))]
)
def test_pil_tiles_then_tensor_equal_reference(size, tiling):
    image = noise_image(*size)
    tiles = dynamic_preprocess(image, min_tiles=tiling[0], max_tiles=tiling[1])
    assert_same(tiles_to_tensor(tiles), ref_pixels(image, max_num=tiling[1], min_num=tiling[0]))


def test_4k_equals_reference():
    image = noise_image(3840, 2160)
    ref = ref_pixels(image, max_num=12)
    assert_same(preprocess_image(image, max_tiles=12), ref)
    assert_same(preprocess_image(image, max_tiles=12, parallel=True), ref)


def test_dynamic_preprocess_tiles_equal_reference_tiles():
    image = noise_image(1000, 600)
    ours = dynamic_preprocess(image, max_tiles=12)
    ref = ref_dynamic_preprocess(image, max_num=12, use_thumbnail=True)
    assert [t.size for t in ours] == [t.size for t in ref]
    assert all(a.tobytes() == b.tobytes() for a, b in zip(ours, ref, strict=True))


def test_other_image_size_and_no_thumbnail():
    image = noise_image(700, 300)
    ref = torch.stack(
        [ref_transform(t, 224) for t in ref_dynamic_preprocess(image, max_num=6, image_size=224)]
    )
    ours = preprocess_image(image, max_tiles=6, image_size=224, use_thumbnail=False)
    assert_same(ours, ref)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF", "MPO"])
def test_load_image_equals_reference_load_image(fmt):
    image = noise_image(900, 500)
    # A two-picture MPO (as phone cameras write) opens through Pillow's JPEG plugin, as format "MPO".
    extra = {"save_all": True, "append_images": [noise_image(900, 500, seed=1)]} if fmt == "MPO" else {}
    data = encode(image, fmt, **extra)
    assert Image.open(io.BytesIO(data)).format == fmt
    assert_same(load_image(data, max_tiles=6, parallel=True), ref_load_image(data, max_num=6))


def test_candidate_grids_equal_reference_order():
    for max_tiles in range(1, 41):
        for min_tiles in range(1, max_tiles + 1):
            assert candidate_grids(min_tiles, max_tiles) == ref_target_ratios(min_tiles, max_tiles)


@pytest.mark.parametrize(
    ("width", "height", "min_tiles", "max_tiles"),
    [
        (3, 2, 1, 2),  # (1, 1) and (2, 1) tie on aspect ratio; a small image keeps the first
        (672, 448, 1, 2),  # same tie, image big enough: the later grid wins
        (5, 4, 2, 2),  # (1, 2) and (2, 1) tie, equal tile counts: set order decides
        (560, 448, 2, 2),
        (10, 4, 1, 6),
        (4480, 1792, 1, 12),
        (1, 1000, 1, 12),
        (1000, 1, 1, 40),
    ],
)
def test_choose_grid_tie_breaks_like_reference(width, height, min_tiles, max_tiles):
    ref = ref_find_closest_aspect_ratio(
        width / height, ref_target_ratios(min_tiles, max_tiles), width, height, 448
    )
    assert choose_grid(width, height, min_tiles=min_tiles, max_tiles=max_tiles, image_size=448) == ref
    ratios = candidate_grids(min_tiles, max_tiles)
    assert find_closest_aspect_ratio(width / height, ratios, width, height, 448) == ref


@settings(max_examples=300, deadline=None)
@given(
    width=st.integers(1, 20000),
    height=st.integers(1, 20000),
    min_tiles=st.integers(1, 6),
    extra=st.integers(0, 30),
    image_size=st.sampled_from([14, 224, 448]),
)
def test_choose_grid_property_equals_reference(width, height, min_tiles, extra, image_size):
    max_tiles = min_tiles + extra
    ref = ref_find_closest_aspect_ratio(
        width / height, ref_target_ratios(min_tiles, max_tiles), width, height, image_size
    )
    got = choose_grid(width, height, min_tiles=min_tiles, max_tiles=max_tiles, image_size=image_size)
    assert got == ref


@settings(max_examples=40, deadline=None)
@given(
    width=st.integers(1, 300),
    height=st.integers(1, 300),
    min_tiles=st.integers(1, 4),
    extra=st.integers(0, 10),
    image_size=st.sampled_from([8, 14, 28]),
    use_thumbnail=st.booleans(),
)
def test_tile_count_and_shape_property(width, height, min_tiles, extra, image_size, use_thumbnail):
    max_tiles = min_tiles + extra
    image = noise_image(width, height, seed=width * 7 + height)
    pixels = preprocess_image(
        image, min_tiles=min_tiles, max_tiles=max_tiles, image_size=image_size, use_thumbnail=use_thumbnail
    )
    cols, rows = choose_grid(width, height, min_tiles=min_tiles, max_tiles=max_tiles, image_size=image_size)
    grid_tiles = cols * rows
    assert min_tiles <= grid_tiles <= max_tiles
    thumbnail = 1 if use_thumbnail and grid_tiles > 1 else 0
    assert pixels.shape == (grid_tiles + thumbnail, 3, image_size, image_size)
    assert pixels.dtype == torch.float32


@pytest.mark.parametrize(("min_tiles", "max_tiles"), [(0, 4), (3, 2)])
def test_bad_tiling_values_are_a_400(min_tiles, max_tiles):
    with pytest.raises(InvalidRequestError):
        choose_grid(10, 10, min_tiles=min_tiles, max_tiles=max_tiles, image_size=448)


# --- decoding ------------------------------------------------------------------------------------


def test_exif_orientation_is_applied():
    image = noise_image(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    data = encode(image, "JPEG", exif=exif.tobytes())
    decoded = decode_image(data)
    assert decoded.size == (20, 40)
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert decoded.tobytes() == expected.tobytes()
    assert load_image(data, max_tiles=1).shape == (1, 3, 448, 448)
    assert load_image(data, max_tiles=2).shape == (3, 3, 448, 448)  # portrait: a (1, 2) grid


def _mode_image(mode: str) -> Image.Image:
    rgb = noise_image(24, 16)
    if mode == "P+transparency":
        image = rgb.convert("P")
        image.info["transparency"] = bytes([0, 128] + [255] * 254)
        return image
    if mode == "I;16":
        return Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
    if mode == "I;16B":
        gray = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257
        return Image.frombytes("I;16B", rgb.size, gray.astype(">u2").tobytes())
    if mode == "I":
        return Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.int32) * 1000 - 5000)
    if mode == "F":
        return Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.float32) / 255)
    return rgb.convert(mode)


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("RGBA", "PNG"),
        ("LA", "PNG"),
        ("P", "PNG"),
        ("P+transparency", "PNG"),
        ("L", "PNG"),
        ("1", "PNG"),
        ("I;16", "PNG"),
        ("I;16B", "TIFF"),
        ("I", "TIFF"),
        ("F", "TIFF"),
        ("CMYK", "JPEG"),
        ("CMYK", "TIFF"),
        ("YCbCr", "TIFF"),
        ("RGBA", "WEBP"),
        ("P", "GIF"),
    ],
)
def test_every_mode_decodes_to_rgb(mode, fmt):
    data = encode(_mode_image(mode), fmt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decoded = decode_image(data)
    assert decoded.mode == "RGB" and decoded.size == (24, 16)
    if mode in ("RGBA", "LA", "P", "P+transparency", "L", "1", "CMYK", "YCbCr"):
        # The reference's Image.open(f).convert("RGB"): alpha dropped, not composited.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = Image.open(io.BytesIO(data)).convert("RGB")
        assert decoded.tobytes() == expected.tobytes()
    assert load_image(data, min_tiles=2, max_tiles=2).shape == (3, 3, 448, 448)


def test_high_bit_depth_is_scaled_not_clipped():
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    decoded = decode_image(encode(Image.fromarray(values), "PNG"))
    assert np.asarray(decoded)[0, :, 0].tolist() == [0, 1, 128, 255]
    floats = np.array([[0.0, 0.5, 1.0, 0.25]], dtype=np.float32)
    decoded = decode_image(encode(Image.fromarray(floats), "TIFF"))
    assert np.asarray(decoded)[0, :, 0].tolist() == [0, 128, 255, 64]
    ints = np.array([[-100, 0, 100, 155]], dtype=np.int32)  # outside 0..255: stretched
    decoded = decode_image(encode(Image.fromarray(ints), "TIFF"))
    assert np.asarray(decoded)[0, :, 0].tolist() == [0, 100, 200, 255]
    constant = np.full((2, 3), 1000, dtype=np.int32)
    assert np.asarray(decode_image(encode(Image.fromarray(constant), "TIFF"))).max() == 255


def test_gif_first_frame_only(monkeypatch):
    frames = [Image.new("RGB", (16, 16), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    seeks: list[int] = []
    original_seek = GifImagePlugin.GifImageFile.seek

    def spy(self, frame):
        seeks.append(frame)
        return original_seek(self, frame)

    monkeypatch.setattr(GifImagePlugin.GifImageFile, "seek", spy)
    decoded = decode_image(data)
    assert decoded.getpixel((0, 0)) == (255, 0, 0)
    assert all(frame == 0 for frame in seeks)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_declaring(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height, with almost no pixel data: decoding it would fail."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(bytes(16))
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def test_decompression_bomb_refused_before_decoding():
    data = _png_declaring(100_000, 100_000)  # 10^10 pixels declared in a 33-byte file
    with pytest.raises(MediaTooLargeError) as caught:
        decode_image(data, max_pixels=10**12)
    assert_safe_message(caught.value)
    with pytest.raises(MediaTooLargeError):
        load_image(data)


@pytest.mark.parametrize("warning_filter", ["ignore", "error"])
def test_pillow_bomb_warning_range_is_refused(warning_filter):
    data = _png_declaring(10_000, 10_000)  # between Pillow's warning (89M) and error (179M) limits
    with warnings.catch_warnings():
        warnings.simplefilter(warning_filter)
        with pytest.raises(MediaTooLargeError):
            decode_image(data, max_pixels=10**12)


def test_max_pixels_checked_on_the_declared_size():
    # A header-only PNG would fail to decode (MediaError): MediaTooLargeError proves nothing was decoded.
    with pytest.raises(MediaTooLargeError) as caught:
        decode_image(_png_declaring(100, 100), max_pixels=9_999)
    assert "10000" in str(caught.value) and "9999" in str(caught.value)
    data = encode(noise_image(100, 100), "PNG")
    assert decode_image(data, max_pixels=10_000).size == (100, 100)
    with pytest.raises(MediaTooLargeError):
        load_image(data, max_pixels=9_999)


def _bad_image_inputs() -> list[tuple[str, bytes]]:
    png = encode(noise_image(64, 64), "PNG")
    jpeg = encode(noise_image(64, 64), "JPEG")
    corrupt_png = png[:60] + bytes(200) + png[260:]
    return [
        ("empty", b""),
        ("truncated png", png[: len(png) // 2]),
        ("corrupt png", corrupt_png),
        ("truncated jpeg", jpeg[: len(jpeg) // 3]),
        ("jpeg header only", jpeg[:20]),
        ("svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>'),
        ("html", b"<!DOCTYPE html><html><body><img src='/etc/passwd'></body></html>"),
        ("ppm", encode(noise_image(8, 8), "PPM")),  # Pillow reads it, we do not accept it
        ("random", bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8))),
    ]


@pytest.mark.parametrize(("name", "data"), _bad_image_inputs(), ids=[n for n, _ in _bad_image_inputs()])
def test_undecodable_images_are_a_clean_media_error(name, data):
    with pytest.raises(MediaError) as caught:
        decode_image(data)
    assert_safe_message(caught.value)
    assert caught.value.__cause__ is None
    with pytest.raises(MediaError):
        load_image(data)


def test_fast_jpeg_draft_keeps_the_grid_and_stays_close():
    data = encode(noise_image(2400, 1800), "JPEG", quality=90)  # grid (2, 2): libjpeg may decode at 1/2
    exact = load_image(data, max_tiles=4)
    fast = load_image(data, max_tiles=4, fast_jpeg_draft=True)
    assert fast.shape == exact.shape == (5, 3, 448, 448)
    assert not torch.equal(fast, exact)  # the reduced-scale decode did happen
    assert (fast - exact).abs().mean().item() < 0.25
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 3000x1500, displayed 1500x3000: a (1, 2) grid, drafted in stored axes
    rotated = encode(noise_image(3000, 1500), "JPEG", quality=90, exif=exif.tobytes())
    exact = load_image(rotated, max_tiles=2)
    fast = load_image(rotated, max_tiles=2, fast_jpeg_draft=True)
    assert fast.shape == exact.shape == (3, 3, 448, 448) and not torch.equal(fast, exact)
    assert (fast - exact).abs().mean().item() < 0.25
    png = encode(noise_image(900, 500), "PNG")  # not a JPEG: the option changes nothing
    assert_same(load_image(png, fast_jpeg_draft=True), load_image(png))


# --- video ---------------------------------------------------------------------------------------

try:
    import av
    import decord  # noqa: F401
except ImportError:  # PyAV comes with the test extra; decord is a runtime dependency
    av = None
needs_video = pytest.mark.skipif(av is None, reason="needs PyAV and decord")


def _encode_video(frames: int = 30, fps: int = 10, width: int = 96, height: int = 48) -> bytes:
    last_error: Exception | None = None
    for codec in ("libx264", "mpeg4"):
        buf = io.BytesIO()
        try:
            with av.open(buf, "w", format="mp4") as container:
                stream = container.add_stream(codec, rate=fps)
                stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
                for i in range(frames):
                    arr = np.asarray(noise_image(width, height, seed=i))
                    for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                        container.mux(packet)
                for packet in stream.encode():
                    container.mux(packet)
            return buf.getvalue()
        except Exception as exc:  # codec missing from this PyAV build: try the next
            last_error = exc
    raise RuntimeError(f"no usable video encoder: {last_error}")


def _zero_frame_video() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 96, 48, "yuv420p"
        container.start_encoding()  # a header with a video track, but no frames
    return buf.getvalue()


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> tuple[bytes, str]:
    """A 96x48 MP4, 30 frames at 10 fps: its bytes and a file holding them (for the reference)."""
    data = _encode_video()
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    path.write_bytes(data)
    return data, str(path)


@pytest.mark.parametrize(
    ("bound", "fps", "max_frame", "num_segments"),
    [
        (None, 10.0, 29, 8),
        (None, 29.97, 1000, 32),
        ((0.5, 2.0), 10.0, 29, 8),
        ((1.0, 100.0), 30.0, 299, 32),
        ((0.0, 0.1), 10.0, 29, 8),
        (None, 10.0, 4, 16),  # more segments than frames: indices repeat
        ((2.0, 3.0), 25.0, 10_000, 1),
    ],
)
def test_get_index_equals_reference(bound, fps, max_frame, num_segments):
    ours = get_index(bound, fps, max_frame, first_idx=0, num_segments=num_segments)
    np.testing.assert_array_equal(ours, ref_get_index(bound, fps, max_frame, 0, num_segments))


@needs_video
@pytest.mark.parametrize(
    ("num_frames", "max_tiles", "bound"),
    [(8, 1, None), (4, 2, None), (6, 1, (0.5, 2.0)), (12, 1, (0.0, 0.5))],  # the last repeats frames
)
def test_load_video_equals_reference(video, num_frames, max_tiles, bound):
    data, path = video
    pixels, per_frame = load_video(data, num_frames=num_frames, max_tiles_per_frame=max_tiles, bound=bound)
    expected, expected_per_frame = ref_load_video(
        path, bound=bound, max_num=max_tiles, num_segments=num_frames
    )
    assert per_frame == expected_per_frame
    assert per_frame == [1 if max_tiles == 1 else 3] * num_frames  # 96x48 with 2 tiles: (2, 1) + thumbnail
    assert_same(pixels, expected)


@needs_video
@pytest.mark.parametrize(
    ("num_frames", "max_tiles", "bound"),
    [(8, 1, None), (4, 2, None), (6, 1, (0.5, 2.0)), (12, 1, (0.0, 0.5)), (30, 1, None)],
)
def test_pyav_picks_and_decodes_the_same_frames_as_decord(video, num_frames, max_tiles, bound):
    """Where decord has no wheel, PyAV decodes: the same frame count, indices and pixels."""
    kwargs = {"num_frames": num_frames, "max_tiles_per_frame": max_tiles, "bound": bound}
    pixels, per_frame = load_video(video[0], reader="pyav", **kwargs)
    expected, expected_per_frame = load_video(video[0], reader="decord", **kwargs)
    assert per_frame == expected_per_frame
    assert_same(pixels, expected)


@needs_video
def test_the_probe_reads_the_container_without_decoding(video, batch_calls):
    info = probe_video(video[0])
    assert (info.width, info.height, info.frames, info.fps) == (96, 48, 30, 10.0)
    assert batch_calls == []


@pytest.fixture
def batch_calls(monkeypatch) -> list[list[int]]:
    """Records every VideoReader.get_batch call: the only way load_video decodes frames."""
    calls: list[list[int]] = []
    original = decord.VideoReader.get_batch

    def spy(self, indices):
        calls.append(list(indices))
        return original(self, indices)

    monkeypatch.setattr(decord.VideoReader, "get_batch", spy)
    return calls


@needs_video
@pytest.mark.parametrize("caps", [{"max_frames_in_file": 29}, {"max_duration_s": 2.5}])
def test_video_caps_refuse_before_decoding(video, batch_calls, caps):
    with pytest.raises(MediaTooLargeError) as caught:
        load_video(video[0], **caps)
    assert_safe_message(caught.value)
    assert batch_calls == []


@needs_video
def test_video_frame_size_checked_before_decoding(video, batch_calls):
    """The container's declared frame size is checked before decord opens the file (which would
    allocate for it) and before any frame is decoded."""
    with pytest.raises(MediaTooLargeError) as caught:
        load_video(video[0], num_frames=8, max_pixels_per_frame=96 * 48 - 1)
    assert "4608" in str(caught.value) and "4607" in str(caught.value)
    assert batch_calls == []
    load_video(video[0], num_frames=20, max_pixels_per_frame=96 * 48)
    assert [len(call) for call in batch_calls] == [8, 8, 4]  # a few frames at a time


BAD_VIDEOS = ["empty", "zero frames", "truncated", "garbage after header", "png", "text", "path"]


@needs_video
@pytest.mark.parametrize("name", BAD_VIDEOS)
def test_undecodable_videos_are_a_clean_media_error(video, name):
    data, path = video
    noise = bytes(np.random.default_rng(2).integers(0, 256, 3000, dtype=np.uint8))
    inputs = {
        "empty": b"",
        "zero frames": _zero_frame_video(),
        "truncated": data[:500],
        "garbage after header": data[:48] + noise,
        "png": encode(noise_image(32, 32), "PNG"),
        "text": b"hello world, this is not a video at all",
        "path": path.encode(),  # bytes are never taken for a file name
    }
    with pytest.raises(MediaError) as caught:
        load_video(inputs[name])
    assert_safe_message(caught.value)


@needs_video
@pytest.mark.parametrize("bound", [(10.0, 20.0), (2.0, 1.0), (float("nan"), 1.0)])
def test_bad_video_bound_is_a_400(video, bound):
    with pytest.raises(InvalidRequestError) as caught:
        load_video(video[0], bound=bound)
    assert caught.value.param == "bound"
