"""Image tiling, video frame sampling and normalization: InternVL's reference preprocessing, bounded.

Pure functions (no server, no model). Pixel values equal the reference `load_image` / `load_video` of
the model cards (PIL bicubic resize, row-major tiles, a thumbnail when there is more than one tile,
ImageNet normalization) with three deliberate differences: EXIF orientation is applied, 16-bit and
float images are scaled to 8 bits instead of clipped, and every size is checked before pixels are
decoded. Errors are MediaError (400) or MediaTooLargeError (413) with messages safe to show a client.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from model_runtime import jpeg_stream, resize
from model_runtime.errors import InvalidRequestError, MediaError, MediaTooLargeError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_MAX_FRAMES_IN_FILE = 100_000
DEFAULT_MAX_DURATION_S = 3600.0

# Raster formats only: Pillow's other plugins (EPS via Ghostscript, PSD, ICO, ...) widen the attack
# surface for no gain. "JPEG" also opens MPO, the multi-picture JPEG of many phone cameras.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_BAD_IMAGE = "could not decode image: unsupported or corrupt data"
_BAD_VIDEO = "could not decode video: unsupported or corrupt data"
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_EXIF_ORIENTATION = 0x0112
_FRAME_BATCH = 8  # video frames decoded per get_batch call


# --- tiling -------------------------------------------------------------------------------------


def find_closest_aspect_ratio(
    aspect_ratio: float,
    target_ratios: Sequence[tuple[int, int]],
    width: int,
    height: int,
    image_size: int,
) -> tuple[int, int]:
    """The reference's grid choice: closest aspect ratio; on a tie a later grid wins if the image is big."""
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff and area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
            best_ratio = ratio
    return best_ratio


def candidate_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """(cols, rows) grids with min_tiles <= cols * rows <= max_tiles, in the reference's order."""
    # The reference sorts a set by tile count, so grids with equal counts keep the set's iteration
    # order, which decides ties. That order depends only on the order in which distinct pairs are
    # first added; its triple loop first meets (i, j) at n = max(min_tiles, i, j), in (i, j) order
    # within each n. Adding pairs in that order rebuilds the same set in O(max_tiles log max_tiles)
    # instead of the reference's O(max_tiles**3).
    pairs = [
        (i, j) for i in range(1, max_tiles + 1) for j in range(1, max_tiles // i + 1) if i * j >= min_tiles
    ]
    pairs.sort(key=lambda p: (max(min_tiles, p[0], p[1]), p[0], p[1]))
    return sorted(set(pairs), key=lambda p: p[0] * p[1])


def _check_tiling(min_tiles: int, max_tiles: int, image_size: int) -> None:
    if min_tiles < 1:
        raise InvalidRequestError(f"min_tiles must be at least 1, got {min_tiles}", param="min_tiles")
    if max_tiles < min_tiles:
        raise InvalidRequestError(
            f"max_tiles ({max_tiles}) must be at least min_tiles ({min_tiles})", param="max_tiles"
        )
    if image_size < 1:
        raise InvalidRequestError(f"image_size must be positive, got {image_size}", param="image_size")


def choose_grid(
    width: int, height: int, *, min_tiles: int, max_tiles: int, image_size: int
) -> tuple[int, int]:
    """The (cols, rows) tile grid the reference picks for an image of this size."""
    _check_tiling(min_tiles, max_tiles, image_size)
    ratios = candidate_grids(min_tiles, max_tiles)
    return find_closest_aspect_ratio(width / height, ratios, width, height, image_size)


def dynamic_preprocess(
    image: Image.Image,
    *,
    min_tiles: int = 1,
    max_tiles: int = 12,
    image_size: int = 448,
    use_thumbnail: bool = True,
) -> list[Image.Image]:
    """The reference tiling as PIL images: row-major crops of the resized image, then the thumbnail."""
    cols, rows = choose_grid(*image.size, min_tiles=min_tiles, max_tiles=max_tiles, image_size=image_size)
    resized = image.resize((cols * image_size, rows * image_size), Image.Resampling.BICUBIC)
    tiles = [
        resized.crop((c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size))
        for r in range(rows)
        for c in range(cols)
    ]
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size), Image.Resampling.BICUBIC))
    return tiles


# --- tensors ------------------------------------------------------------------------------------


def _normalize_(pixels: torch.Tensor) -> torch.Tensor:
    # pixels: [..., 3, H, W] float32 holding 0..255. Same float32 operations, in the same order, as
    # torchvision's ToTensor (x / 255) then Normalize ((x - mean) / std), so the values are identical.
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    return pixels.div_(255).sub_(mean).div_(std)


def _hwc_uint8(image: Image.Image) -> torch.Tensor:
    # A writable copy: torch refuses to wrap the read-only buffer np.asarray(image) gives without a warning.
    width, height = image.size
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(height, width, 3)


def tiles_to_tensor(tiles: Sequence[Image.Image]) -> torch.Tensor:
    """Equal-size tiles -> [N, 3, S, S] float32, normalized as the reference's per-tile transform."""
    arrays = np.stack([np.asarray(t if t.mode == "RGB" else t.convert("RGB"), dtype=np.uint8) for t in tiles])
    # arrays: [N, S, S, 3] uint8
    pixels = torch.empty((arrays.shape[0], 3, arrays.shape[1], arrays.shape[2]), dtype=torch.float32)
    pixels.copy_(torch.from_numpy(arrays).permute(0, 3, 1, 2))
    return _normalize_(pixels)


class _TileTensor:
    """[tiles (+ thumbnail), 3, S, S] float32, filled piece by piece from the resized grid image and
    the thumbnail, each piece normalized as the reference's per-tile transform normalizes it."""

    def __init__(self, cols: int, rows: int, image_size: int, use_thumbnail: bool) -> None:
        self.size, self.cols, self.rows = image_size, cols, rows
        self.n = cols * rows
        self.thumbnail = use_thumbnail and self.n != 1
        self.pixels = torch.empty(
            (self.n + int(self.thumbnail), 3, image_size, image_size), dtype=torch.float32
        )

    def fill_grid(self, left: int, top: int, piece: Image.Image) -> None:
        """A piece of the grid image made of whole tiles, its top-left corner at (left, top)."""
        size = self.size
        r, c, nr, nc = top // size, left // size, piece.height // size, piece.width // size
        hwc = _hwc_uint8(piece).view(nr, size, nc, size, 3).permute(0, 2, 4, 1, 3)
        tiles = self.pixels[: self.n].view(self.rows, self.cols, 3, size, size)
        _normalize_(tiles[r : r + nr, c : c + nc].copy_(hwc))

    def fill_thumbnail(self, left: int, top: int, piece: Image.Image) -> None:
        region = self.pixels[self.n, :, top : top + piece.height, left : left + piece.width]
        _normalize_(region.copy_(_hwc_uint8(piece).permute(2, 0, 1)))


def _grid_tensor(
    image: Image.Image, cols: int, rows: int, image_size: int, use_thumbnail: bool
) -> torch.Tensor:
    # Equals tiles_to_tensor(dynamic_preprocess(image)) for that grid, but resizes once and slices the
    # tiles out of one array instead of cropping and converting each tile in PIL.
    out = _TileTensor(cols, rows, image_size, use_thumbnail)
    out.fill_grid(0, 0, image.resize((cols * image_size, rows * image_size), resize.BICUBIC))
    if out.thumbnail:
        out.fill_thumbnail(0, 0, image.resize((image_size, image_size), resize.BICUBIC))
    return out.pixels


class _ParallelTiles:
    """The tensor of _grid_tensor, with both resizes cut into strips on the shared resize pool
    (model_runtime/resize.py says why the pixels stay identical). The grid's last pass is cut at
    tile boundaries, so each strip fills and normalizes whole tiles on the thread that made it.

    The first passes start when the object is made, on the rows the image has so far
    (rows_ready; all by default); release(rows) reports more, result() needs the whole image.
    """

    def __init__(
        self,
        image: Image.Image,
        cols: int,
        rows: int,
        image_size: int,
        use_thumbnail: bool,
        *,
        rows_ready: int | None = None,
        first_parts: int | None = None,
    ) -> None:
        self.out = _TileTensor(cols, rows, image_size, use_thumbnail)
        pool, workers = resize.shared_pool(), resize.pool_size()
        self.workers = workers
        kwargs = {"first_parts": first_parts, "rows_ready": rows_ready}
        # Both first passes are queued before either resize waits for its own.
        grid = resize.StripResize(pool, image, (cols * image_size, rows * image_size), workers, **kwargs)
        self.jobs = [(grid, self.out.fill_grid, image_size)]
        if self.out.thumbnail:
            thumb = resize.StripResize(pool, image, (image_size, image_size), workers, **kwargs)
            self.jobs.append((thumb, self.out.fill_thumbnail, 1))

    def release(self, rows: int, busy_cores: int = 0) -> None:
        """Queue first-pass strips over the top `rows` rows of the image, leaving `busy_cores` cores
        to other work (the decoder): at most workers - busy_cores strips in flight, taken from the
        resizes in turn."""
        if not busy_cores:
            for job, _, _ in self.jobs:
                job.release(rows)
            return
        budget = self.workers - busy_cores - sum(job.in_flight() for job, _, _ in self.jobs)
        while budget > 0:
            queued = 0
            for job, _, _ in self.jobs:
                if budget > 0 and job.release(rows, limit=1):
                    queued += 1
                    budget -= 1
            if not queued:
                return

    def cancel(self) -> None:
        for job, _, _ in self.jobs:
            job.cancel()

    def result(self) -> torch.Tensor:
        # Every first-pass strip goes into the queue before any last-pass strip: one resize's last
        # pass must not hold up the other's first.
        self.release(2**31 - 1)
        pending = []
        for job, fill, align in self.jobs:
            pending += job.finish(fill, align)
        for future in pending:
            future.result()
        return self.out.pixels


def _grid_tensor_parallel(
    image: Image.Image, cols: int, rows: int, image_size: int, use_thumbnail: bool
) -> torch.Tensor:
    return _ParallelTiles(image, cols, rows, image_size, use_thumbnail).result()


# A JPEG this large is decoded while its top rows already resize (model_runtime/jpeg_stream.py);
# below it the decode is too short to be worth the bookkeeping.
STREAM_MIN_PIXELS = 2_000_000
_STREAM_BAND_ROWS = 256  # rows per first-pass strip while streaming


def _streamed_tensor(
    image: Image.Image,
    reader: jpeg_stream.ProbingReader,
    cols: int,
    rows: int,
    image_size: int,
    use_thumbnail: bool,
) -> torch.Tensor:
    """load_image's tensor for a large RGB JPEG, resizing finished rows while the rest decodes."""
    # Not filled: the decoder overwrites every row before a strip reads it, and DecodedRows blackens
    # the pixels it watches (filling 48 MB would cost a third of the decode).
    canvas = Image.new("RGB", image.size, None)
    image.im = canvas.im  # Pillow decodes into memory the image already has
    decoded = jpeg_stream.DecodedRows(canvas)
    parts = max(1, image.height // _STREAM_BAND_ROWS)
    tiles = _ParallelTiles(canvas, cols, rows, image_size, use_thumbnail, rows_ready=0, first_parts=parts)
    # The decoding thread keeps one core; the strips of finished rows get the others.
    reader.on_read = lambda: tiles.release(decoded.update(), busy_cores=1)
    try:
        loaded = _decode_pixels(image)
    except BaseException:
        tiles.cancel()
        raise
    finally:
        reader.on_read = None
    if loaded.im is not canvas.im:
        # This Pillow decoded into memory of its own: the strips saw only black. Start over.
        tiles.cancel()
        return _grid_tensor_parallel(loaded, cols, rows, image_size, use_thumbnail)
    return tiles.result()


def preprocess_image(
    image: Image.Image,
    *,
    max_tiles: int = 12,
    min_tiles: int = 1,
    image_size: int = 448,
    use_thumbnail: bool = True,
    parallel: bool = False,
) -> torch.Tensor:
    """A decoded image -> [tiles, 3, S, S] float32, equal to the reference tiling + transform.

    parallel: cut both resizes into strips on the shared resize pool, one thread per core (same
    pixels; see model_runtime/resize.py). Faster for large images when cores are free, no gain on a
    saturated machine.
    """
    image = _to_rgb(image)
    cols, rows = choose_grid(*image.size, min_tiles=min_tiles, max_tiles=max_tiles, image_size=image_size)
    build = _grid_tensor_parallel if parallel and resize.matches_pillow() else _grid_tensor
    return build(image, cols, rows, image_size, use_thumbnail)


# --- image decoding -----------------------------------------------------------------------------


def _too_large(what: str, pixels: int, limit: int) -> MediaTooLargeError:
    return MediaTooLargeError(f"{what} has {pixels} pixels, more than the limit of {limit} pixels")


def _pixel_limit(max_pixels: int) -> int:
    # Pillow's decompression-bomb guard stays in force even when max_pixels is set higher.
    bomb = Image.MAX_IMAGE_PIXELS
    return max_pixels if bomb is None else min(max_pixels, int(bomb))


def _open_image(data: bytes, max_pixels: int, fp: io.BytesIO | None = None) -> Image.Image:
    """Reads the header only and checks the declared size; no pixel is decoded yet.

    fp: the file object Pillow reads `data` through (a fresh BytesIO by default)."""
    if not data:
        raise MediaError("could not decode image: no data")
    limit = _pixel_limit(max_pixels)
    bomb = int(Image.MAX_IMAGE_PIXELS or 0)
    try:
        image = Image.open(fp or io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError:
        # Pillow refuses over 2x MAX_IMAGE_PIXELS inside open(); its text is not ours to forward.
        raise MediaTooLargeError(f"image has more than {2 * bomb} pixels; the limit is {limit}") from None
    except Image.DecompressionBombWarning:
        # Over 1x it warns, which is an exception where warnings are errors.
        raise MediaTooLargeError(f"image has more than {bomb} pixels; the limit is {limit}") from None
    except Exception:
        raise MediaError(_BAD_IMAGE) from None
    width, height = image.size
    if width < 1 or height < 1:
        raise MediaError(_BAD_IMAGE)
    if width * height > limit:
        raise _too_large(f"image of {width}x{height}", width * height, limit)
    return image


def _streamable(image: Image.Image) -> bool:
    """A large baseline-or-progressive RGB JPEG stored upright: _streamed_tensor's case."""
    width, height = image.size
    return (
        image.format == "JPEG"  # not MPO, whose loader differs
        and image.mode == "RGB"
        and width * height >= STREAM_MIN_PIXELS
        and _orientation(image) == 1  # no EXIF rotation after decoding
    )


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:
        return 1  # a broken EXIF block leaves the pixels usable; the reference ignores EXIF anyway


def _high_depth_to_8bit(image: Image.Image) -> Image.Image:
    # Pillow's convert("RGB") clips these modes at 255, which turns most 16-bit images white. We scale
    # instead: 16-bit modes by their full range (v / 257, rounded); 32-bit int and float images have no
    # nominal range, so their values are kept when they already lie in 0..255 (floats in 0..1 are
    # taken as unit range) and are otherwise stretched linearly from [min, max] to [0, 255].
    values = np.asarray(image)
    if image.mode.startswith("I;16"):
        scaled = (values.astype(np.uint32) * 255 + 32767) // 65535
    else:
        data = values.astype(np.float64)
        finite = np.isfinite(data)
        if not finite.any():
            data = np.zeros_like(data)
            low = high = 0.0
        else:
            low, high = float(data[finite].min()), float(data[finite].max())
            data = np.nan_to_num(data, nan=low, posinf=high, neginf=low)
        if image.mode == "F" and low >= 0.0 and high <= 1.0:
            data = data * 255.0
        elif (low < 0.0 or high > 255.0) and high > low:
            data = (data - low) * (255.0 / (high - low))
        scaled = np.clip(np.rint(data), 0, 255)  # also settles a constant image outside 0..255
    return Image.fromarray(scaled.astype(np.uint8))


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image  # the reference's convert("RGB") would only copy it
    if image.mode in _HIGH_DEPTH_MODES:
        return _high_depth_to_8bit(image).convert("RGB")
    if "transparency" in image.info:
        # Palette transparency never changes convert("RGB")'s pixels (alpha is dropped, as in the
        # reference), but byte-string transparency makes Pillow warn on every such image.
        image = image.copy()
        del image.info["transparency"]
    return image.convert("RGB")


def _decode_pixels(image: Image.Image) -> Image.Image:
    try:
        image.load()  # first frame only: we never seek, so animations are not iterated
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise MediaTooLargeError("image is too large to decode safely") from None
    except Exception:
        raise MediaError(_BAD_IMAGE) from None
    with contextlib.suppress(Exception):
        ImageOps.exif_transpose(image, in_place=True)  # broken EXIF: keep the stored orientation
    try:
        return _to_rgb(image)
    except Exception:
        raise MediaError(_BAD_IMAGE) from None


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Encoded bytes -> RGB PIL image, EXIF orientation applied; refuses oversize images before decoding."""
    return _decode_pixels(_open_image(data, max_pixels))


def load_image(
    data: bytes,
    *,
    max_tiles: int = 12,
    min_tiles: int = 1,
    image_size: int = 448,
    use_thumbnail: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    fast_jpeg_draft: bool = False,
    parallel: bool = False,
) -> torch.Tensor:
    """Encoded image -> [tiles, 3, S, S] float32, equal to the reference `load_image`.

    parallel: resize in strips on every core (see preprocess_image); large upright RGB JPEGs also
    start resizing their top rows while the rest decodes (model_runtime/jpeg_stream.py). Same pixels.
    fast_jpeg_draft: decode large JPEGs at a reduced DCT scale (never below the tile grid's size).
    The grid is still chosen from the full size, so the tile count is unchanged; pixels differ a
    little (see benchmarks/preprocess.py). Off by default: the default output is exact.
    """
    _check_tiling(min_tiles, max_tiles, image_size)
    reader = jpeg_stream.ProbingReader(data)
    image = _open_image(data, max_pixels, reader)
    if parallel and not fast_jpeg_draft and _streamable(image) and resize.matches_pillow():
        cols, rows = choose_grid(*image.size, min_tiles=min_tiles, max_tiles=max_tiles, image_size=image_size)
        return _streamed_tensor(image, reader, cols, rows, image_size, use_thumbnail)
    if fast_jpeg_draft and image.format in ("JPEG", "MPO"):
        # Choose the grid from the full size first so that drafting never changes the tile count.
        # (Only JPEG's EXIF can be read before decoding; for PNG reading it would decode the image.)
        width, height = image.size
        swapped = _orientation(image) in (5, 6, 7, 8)
        if swapped:
            width, height = height, width
        cols, rows = choose_grid(
            width, height, min_tiles=min_tiles, max_tiles=max_tiles, image_size=image_size
        )
        draft_size = (
            (rows * image_size, cols * image_size) if swapped else (cols * image_size, rows * image_size)
        )
        with contextlib.suppress(Exception):
            # libjpeg decodes at 1/2, 1/4 or 1/8 scale, never below the grid's size.
            image.draft(None, draft_size)
        build = _grid_tensor_parallel if parallel and resize.matches_pillow() else _grid_tensor
        return build(_decode_pixels(image), cols, rows, image_size, use_thumbnail)
    return preprocess_image(
        _decode_pixels(image),
        max_tiles=max_tiles,
        min_tiles=min_tiles,
        image_size=image_size,
        use_thumbnail=use_thumbnail,
        parallel=parallel,
    )


# --- video --------------------------------------------------------------------------------------


def get_index(
    bound: tuple[float, float] | None,
    fps: float,
    max_frame: int,
    first_idx: int = 0,
    num_segments: int = 32,
) -> np.ndarray:
    """The reference frame sampler: the middle frame of num_segments equal segments of [bound]."""
    if bound:
        start, end = bound[0], bound[1]
    else:
        start, end = -100000, 100000
    start_idx = max(first_idx, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    seg_size = float(end_idx - start_idx) / num_segments
    frame_indices = np.array(
        [int(start_idx + (seg_size / 2) + np.round(seg_size * idx)) for idx in range(num_segments)]
    )
    return frame_indices


def _looks_like_video(data: bytes) -> bool:
    # Only common containers reach ffmpeg: it probes hundreds of formats otherwise, and decord logs
    # the bytes it could not open to stderr as if they were a file name.
    head = data[:12]
    return (
        data[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip")  # MP4, MOV, 3GP
        or head.startswith(b"\x1a\x45\xdf\xa3")  # Matroska, WebM
        or (head.startswith(b"RIFF") and head[8:12] == b"AVI ")
        or head.startswith((b"FLV", b"OggS", b"\x00\x00\x01\xba"))  # FLV, Ogg, MPEG-PS
        or (len(data) > 376 and data[0] == data[188] == data[376] == 0x47)  # MPEG-TS
    )


def _decode_frames(reader: Any, indices: np.ndarray) -> np.ndarray:
    try:
        batch = reader.get_batch([int(i) for i in indices])
        frames = batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)
    except Exception:
        raise MediaError(_BAD_VIDEO) from None
    if frames.ndim != 4 or frames.shape[0] != len(indices) or frames.shape[-1] != 3:
        raise MediaError(_BAD_VIDEO)
    return frames  # [n, H, W, 3] uint8


def load_video(
    data: bytes,
    *,
    num_frames: int = 8,
    max_tiles_per_frame: int = 1,
    bound: tuple[float, float] | None = None,
    image_size: int = 448,
    use_thumbnail: bool = True,
    max_frames_in_file: int = DEFAULT_MAX_FRAMES_IN_FILE,
    max_duration_s: float = DEFAULT_MAX_DURATION_S,
    max_pixels_per_frame: int = DEFAULT_MAX_PIXELS,
) -> tuple[torch.Tensor, list[int]]:
    """Encoded video -> (pixel values of all sampled frames concatenated, tiles per frame).

    Equal to the reference `load_video` (decord, get_index, dynamic_preprocess per frame). Frame
    count, fps and duration are checked from the container before any frame is decoded; decord has
    no frame-size metadata, so the size is checked on the first sampled frame before the others.
    """
    if num_frames < 1:
        raise InvalidRequestError(f"num_frames must be at least 1, got {num_frames}", param="num_frames")
    _check_tiling(1, max_tiles_per_frame, image_size)
    if bound is not None and not (
        len(bound) == 2 and all(math.isfinite(t) for t in bound) and bound[0] <= bound[1]
    ):
        raise InvalidRequestError("bound must be (start, end) in seconds with start <= end", param="bound")
    if not data or not _looks_like_video(data):
        raise MediaError(_BAD_VIDEO)
    try:
        # Imported here: images keep working where decord has no wheel, and its ffmpeg loads on first use.
        from decord import VideoReader, cpu
    except ImportError:
        raise MediaError("video input is not supported by this server (decord is not installed)") from None

    try:
        reader = VideoReader(io.BytesIO(data), ctx=cpu(0), num_threads=1)
        frame_count = len(reader)
        fps = float(reader.get_avg_fps())
    except Exception:  # decord raises RuntimeError, DECORDError or AssertionError (zero frames)
        raise MediaError(_BAD_VIDEO) from None
    if frame_count < 1:
        raise MediaError("could not decode video: it has no frames")
    if not math.isfinite(fps) or fps <= 0:
        raise MediaError("could not decode video: no valid frame rate")
    if frame_count > max_frames_in_file:
        raise MediaTooLargeError(
            f"video has {frame_count} frames, more than the limit of {max_frames_in_file}"
        )
    duration = frame_count / fps
    if duration > max_duration_s:
        raise MediaTooLargeError(
            f"video lasts {duration:.1f} s, longer than the limit of {max_duration_s:g} s"
        )
    indices = get_index(bound, fps, frame_count - 1, first_idx=0, num_segments=num_frames)
    if indices.min() < 0 or indices.max() > frame_count - 1:
        # Only a bound outside the video gets here (the reference would then fail inside decord).
        raise InvalidRequestError(
            f"bound {bound} lies outside the video, which lasts {duration:.2f} s", param="bound"
        )
    # Decode each distinct frame once, in file order: the first alone (to check its size before the
    # others), then a few at a time, tiling each batch before the next so that only a handful of
    # full-resolution frames is ever held.
    unique, inverse = np.unique(indices, return_inverse=True)
    first = _decode_frames(reader, unique[:1])
    height, width = first.shape[1:3]
    if width * height > max_pixels_per_frame:
        raise _too_large(f"video frame of {width}x{height}", width * height, max_pixels_per_frame)
    cols, rows = choose_grid(width, height, min_tiles=1, max_tiles=max_tiles_per_frame, image_size=image_size)
    per_frame: list[torch.Tensor] = []

    def tile(frames: np.ndarray) -> None:
        for frame in frames:
            per_frame.append(_grid_tensor(Image.fromarray(frame), cols, rows, image_size, use_thumbnail))

    tile(first)
    for start in range(1, len(unique), _FRAME_BATCH):
        tile(_decode_frames(reader, unique[start : start + _FRAME_BATCH]))
    order = inverse.reshape(-1)
    return torch.cat([per_frame[k] for k in order]), [per_frame[k].shape[0] for k in order]
