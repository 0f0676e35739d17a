"""Video frames, bounded: encoded bytes -> the reference's sampled frames -> tiles.

Equal to the model cards' `load_video` (decord, `get_index`, `dynamic_preprocess` per frame). Frame
count, fps and duration are checked from the container before any frame is decoded.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import torch
from PIL import Image

from model_runtime.errors import InvalidRequestError, MediaError, MediaTooLargeError
from model_runtime.inputs.image import DEFAULT_MAX_PIXELS, too_large
from model_runtime.inputs.tiling import check_tiling, choose_grid, grid_tensor

DEFAULT_MAX_FRAMES_IN_FILE = 100_000
DEFAULT_MAX_DURATION_S = 3600.0
_BAD_VIDEO = "could not decode video: unsupported or corrupt data"
_FRAME_BATCH = 8  # video frames decoded per get_batch call


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
    check_tiling(1, max_tiles_per_frame, image_size)
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
        raise too_large(f"video frame of {width}x{height}", width * height, max_pixels_per_frame)
    cols, rows = choose_grid(width, height, min_tiles=1, max_tiles=max_tiles_per_frame, image_size=image_size)
    per_frame: list[torch.Tensor] = []

    def tile(frames: np.ndarray) -> None:
        for frame in frames:
            per_frame.append(grid_tensor(Image.fromarray(frame), cols, rows, image_size, use_thumbnail))

    tile(first)
    for start in range(1, len(unique), _FRAME_BATCH):
        tile(_decode_frames(reader, unique[start : start + _FRAME_BATCH]))
    order = inverse.reshape(-1)
    return torch.cat([per_frame[k] for k in order]), [per_frame[k].shape[0] for k in order]
