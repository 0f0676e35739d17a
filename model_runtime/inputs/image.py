"""Image decoding, bounded: encoded bytes -> RGB image -> InternVL tiles.

Pixel values equal the reference `load_image` of the model cards with three deliberate differences:
EXIF orientation is applied, 16-bit and float images are scaled to 8 bits instead of clipped, and
the declared size is checked before any pixel is decoded. Errors are MediaError (400) or
MediaTooLargeError (413) with messages safe to show a client.
"""

from __future__ import annotations

import contextlib
import io
import time

import numpy as np
import torch
from PIL import Image, ImageOps

from model_runtime.errors import MediaError, MediaTimeoutError, MediaTooLargeError
from model_runtime.inputs import resize
from model_runtime.inputs.tiling import check_tiling, choose_grid, grid_tensor, grid_tensor_parallel

DEFAULT_MAX_PIXELS = 50_000_000

# Raster formats only: Pillow's other plugins (EPS via Ghostscript, PSD, ICO, ...) widen the attack
# surface for no gain. "JPEG" also opens MPO, the multi-picture JPEG of many phone cameras.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_BAD_IMAGE = "could not decode image: unsupported or corrupt data"
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_EXIF_ORIENTATION = 0x0112
_BMP_RLE = (1, 2)  # BI_RLE8, BI_RLE4


def check_deadline(deadline: float | None, what: str) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise MediaTimeoutError(
            f"decoding this {what} took longer than the server's limit (media_decode_timeout_s); "
            "send it as JPEG or PNG, or smaller"
        )


def too_large(what: str, pixels: int, limit: int) -> MediaTooLargeError:
    return MediaTooLargeError(f"{what} has {pixels} pixels, more than the limit of {limit} pixels")


def _pixel_limit(max_pixels: int) -> int:
    # Pillow's decompression-bomb guard stays in force even when max_pixels is set higher.
    bomb = Image.MAX_IMAGE_PIXELS
    return max_pixels if bomb is None else min(max_pixels, int(bomb))


def _open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Reads the header only and checks the declared size; no pixel is decoded yet."""
    if not data:
        raise MediaError("could not decode image: no data")
    limit = _pixel_limit(max_pixels)
    bomb = int(Image.MAX_IMAGE_PIXELS or 0)
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
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
        raise too_large(f"image of {width}x{height}", width * height, limit)
    if image.format == "BMP" and image.info.get("compression") in _BMP_RLE:
        # Pillow decodes run-length BMPs in Python: a 400 KB file can take seconds of a worker.
        raise MediaError("run-length compressed BMP images are not supported; send PNG or JPEG")
    return image


def probe_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) as the image will be tiled (EXIF rotation applied), from the header alone;
    the same size checks as decoding, before any pixel is decoded."""
    image = _open_image(data, max_pixels)
    width, height = image.size
    return (height, width) if _orientation(image) in (5, 6, 7, 8) else (width, height)


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
    build = grid_tensor_parallel if parallel and resize.matches_pillow() else grid_tensor
    return build(image, cols, rows, image_size, use_thumbnail)


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
    deadline: float | None = None,
) -> torch.Tensor:
    """Encoded image -> [tiles, 3, S, S] float32, equal to the reference `load_image`.

    parallel: resize in strips on every core (see preprocess_image). Same pixels.
    fast_jpeg_draft: decode large JPEGs at a reduced DCT scale (never below the tile grid's size).
    The grid is still chosen from the full size, so the tile count is unchanged; pixels differ a
    little (see benchmarks/preprocess.py). Off by default: the default output is exact.
    deadline: a time.monotonic() by which decoding must be done; checked once the pixels are
    decoded (Pillow's decoders cannot be interrupted), before tiling, which is then not started.
    """
    check_tiling(min_tiles, max_tiles, image_size)
    image = _open_image(data, max_pixels)
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
        build = grid_tensor_parallel if parallel and resize.matches_pillow() else grid_tensor
        decoded = _decode_pixels(image)
        check_deadline(deadline, "image")
        return build(decoded, cols, rows, image_size, use_thumbnail)
    decoded = _decode_pixels(image)
    check_deadline(deadline, "image")
    return preprocess_image(
        decoded,
        max_tiles=max_tiles,
        min_tiles=min_tiles,
        image_size=image_size,
        use_thumbnail=use_thumbnail,
        parallel=parallel,
    )
