"""Video frames, bounded: encoded bytes -> the reference's sampled frames -> tiles.

Equal to the model cards' `load_video` (decord, `get_index`, `dynamic_preprocess` per frame). Before
any frame is decoded, the container's own metadata is read with PyAV's demuxer (frame size, frame
count, frame rate, duration) and checked against the caps: decord allocates buffers for the
declared frame size when it opens a file, so a 5 MB file declaring 16000x16000 frames must be
refused before that. Frames are decoded with decord where it is installed (what the model cards
use); elsewhere (no decord wheel for aarch64 Linux or macOS) with PyAV, which picks the same frames:
the same `get_index` over the same frame count, frames counted in presentation order.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from model_runtime.errors import InvalidRequestError, MediaError, MediaTooLargeError
from model_runtime.inputs.image import DEFAULT_MAX_PIXELS, check_deadline, too_large
from model_runtime.inputs.tiling import check_tiling, choose_grid, grid_tensor

DEFAULT_MAX_FRAMES_IN_FILE = 100_000
DEFAULT_MAX_DURATION_S = 3600.0
_BAD_VIDEO = "could not decode video: unsupported or corrupt data"
_FRAME_BATCH = 8  # video frames decoded per get_batch call


@dataclass(frozen=True)
class VideoInfo:
    """What the container declares, read without decoding a frame."""

    width: int
    height: int
    frames: int
    fps: float

    @property
    def duration_s(self) -> float:
        return self.frames / self.fps


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


def _open_container(data: bytes) -> Any:
    import av

    try:
        container = av.open(io.BytesIO(data), mode="r")
    except Exception:  # noqa: BLE001 - PyAV raises many error classes for bad input
        raise MediaError(_BAD_VIDEO) from None
    if not container.streams.video:
        container.close()
        raise MediaError("could not decode video: it has no video stream")
    return container


def probe_video(
    data: bytes,
    *,
    max_frames_in_file: int = DEFAULT_MAX_FRAMES_IN_FILE,
    max_duration_s: float = DEFAULT_MAX_DURATION_S,
    max_pixels_per_frame: int = DEFAULT_MAX_PIXELS,
) -> VideoInfo:
    """The container's frame size, count and rate, checked against the caps; no frame is decoded."""
    if not data or not _looks_like_video(data):
        raise MediaError(_BAD_VIDEO)
    container = _open_container(data)
    try:
        stream = container.streams.video[0]
        width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        frames = int(stream.frames or 0)
        if frames <= 0 and stream.duration and stream.time_base and fps > 0:
            frames = round(float(stream.duration * stream.time_base) * fps)
        if frames <= 0 and container.duration and fps > 0:  # microseconds
            frames = round(container.duration / 1_000_000 * fps)
    except MediaError:
        raise
    except Exception:  # noqa: BLE001
        raise MediaError(_BAD_VIDEO) from None
    finally:
        container.close()
    if width < 1 or height < 1:
        raise MediaError("could not decode video: no valid frame size")
    if width * height > max_pixels_per_frame:
        raise too_large(f"video frame of {width}x{height}", width * height, max_pixels_per_frame)
    if not math.isfinite(fps) or fps <= 0:
        raise MediaError("could not decode video: no valid frame rate")
    if frames > max_frames_in_file:
        raise MediaTooLargeError(f"video has {frames} frames, more than the limit of {max_frames_in_file}")
    info = VideoInfo(width, height, max(frames, 1), fps)
    if info.duration_s > max_duration_s:
        raise MediaTooLargeError(
            f"video lasts {info.duration_s:.1f} s, longer than the limit of {max_duration_s:g} s"
        )
    return info


def video_tiles_per_frame(
    info: VideoInfo, max_tiles_per_frame: int, image_size: int, use_thumbnail: bool
) -> int:
    """Tiles each sampled frame becomes, from the declared frame size alone."""
    cols, rows = choose_grid(
        info.width, info.height, min_tiles=1, max_tiles=max_tiles_per_frame, image_size=image_size
    )
    return cols * rows + int(use_thumbnail and cols * rows != 1)


class _Decord:
    """Frames through decord, as the model cards read them."""

    def __init__(self, data: bytes) -> None:
        from decord import VideoReader, cpu

        try:
            self.reader = VideoReader(io.BytesIO(data), ctx=cpu(0), num_threads=1)
            self.frames = len(self.reader)
            self.fps = float(self.reader.get_avg_fps())
        except Exception:  # decord raises RuntimeError, DECORDError or AssertionError (zero frames)
            raise MediaError(_BAD_VIDEO) from None

    def decode(self, indices: np.ndarray) -> Iterator[np.ndarray]:
        """Frames [H, W, 3] uint8 at the (sorted, distinct) indices, a few at a time."""
        for start in range(0, len(indices), _FRAME_BATCH):
            wanted = indices[start : start + _FRAME_BATCH]
            try:
                batch = self.reader.get_batch([int(i) for i in wanted])
                frames = batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)
            except Exception:
                raise MediaError(_BAD_VIDEO) from None
            if frames.ndim != 4 or frames.shape[0] != len(wanted) or frames.shape[-1] != 3:
                raise MediaError(_BAD_VIDEO)
            yield from frames


class _PyAV:
    """Frames through PyAV where decord is not installed: frames counted in presentation order (as
    decord indexes them), the count from the demuxed packets, the rate from the stream."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        container = _open_container(data)
        try:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            self.fps = float(rate) if rate else 0.0
            self.frames = sum(1 for packet in container.demux(stream) if packet.size)
        except Exception:  # noqa: BLE001
            raise MediaError(_BAD_VIDEO) from None
        finally:
            container.close()

    def decode(self, indices: np.ndarray) -> Iterator[np.ndarray]:
        container = _open_container(self.data)
        wanted = iter(int(i) for i in indices)
        target = next(wanted, None)
        try:
            for position, frame in enumerate(container.decode(video=0)):
                while target is not None and target == position:
                    yield frame.to_ndarray(format="rgb24")
                    target = next(wanted, None)
                if target is None:
                    return
        except MediaError:
            raise
        except Exception:  # noqa: BLE001
            raise MediaError(_BAD_VIDEO) from None
        finally:
            container.close()
        if target is not None:
            raise MediaError(_BAD_VIDEO)


def _reader(data: bytes) -> _Decord | _PyAV:
    try:
        import decord  # noqa: F401
    except ImportError:
        return _PyAV(data)
    return _Decord(data)


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
    reader: str = "auto",
    deadline: float | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """Encoded video -> (pixel values of all sampled frames concatenated, tiles per frame).

    Equal to the reference `load_video` (decord, get_index, dynamic_preprocess per frame); caps are
    checked on the container's metadata before any frame is decoded (probe_video). `reader`: auto
    (decord if installed, else PyAV), decord or pyav. `deadline` (a time.monotonic()) is checked
    after each decoded frame.
    """
    if num_frames < 1:
        raise InvalidRequestError(f"num_frames must be at least 1, got {num_frames}", param="num_frames")
    check_tiling(1, max_tiles_per_frame, image_size)
    if bound is not None and not (
        len(bound) == 2 and all(math.isfinite(t) for t in bound) and bound[0] <= bound[1]
    ):
        raise InvalidRequestError("bound must be (start, end) in seconds with start <= end", param="bound")
    info = probe_video(
        data,
        max_frames_in_file=max_frames_in_file,
        max_duration_s=max_duration_s,
        max_pixels_per_frame=max_pixels_per_frame,
    )
    source = {"auto": _reader, "decord": _Decord, "pyav": _PyAV}[reader](data)
    frame_count, fps = source.frames, source.fps
    if frame_count < 1:
        raise MediaError("could not decode video: it has no frames")
    if not math.isfinite(fps) or fps <= 0:
        raise MediaError("could not decode video: no valid frame rate")
    if frame_count > max_frames_in_file:  # the reader's own count, should the container's have lied
        raise MediaTooLargeError(
            f"video has {frame_count} frames, more than the limit of {max_frames_in_file}"
        )
    indices = get_index(bound, fps, frame_count - 1, first_idx=0, num_segments=num_frames)
    if indices.min() < 0 or indices.max() > frame_count - 1:
        # Only a bound outside the video gets here (the reference would then fail inside decord).
        raise InvalidRequestError(
            f"bound {bound} lies outside the video, which lasts {frame_count / fps:.2f} s", param="bound"
        )
    cols, rows = choose_grid(
        info.width, info.height, min_tiles=1, max_tiles=max_tiles_per_frame, image_size=image_size
    )
    # Each distinct frame is decoded once, in file order, and tiled before the next is decoded, so
    # that only a handful of full-resolution frames is ever held.
    unique, inverse = np.unique(indices, return_inverse=True)
    per_frame: list[torch.Tensor] = []
    for frame in source.decode(unique):
        check_deadline(deadline, "video")
        if frame.shape[:2] != (info.height, info.width):  # the container declared another size
            height, width = frame.shape[:2]
            if width * height > max_pixels_per_frame:
                raise too_large(f"video frame of {width}x{height}", width * height, max_pixels_per_frame)
            cols, rows = choose_grid(
                width, height, min_tiles=1, max_tiles=max_tiles_per_frame, image_size=image_size
            )
        per_frame.append(grid_tensor(Image.fromarray(frame), cols, rows, image_size, use_thumbnail))
    if len(per_frame) != len(unique):
        raise MediaError(_BAD_VIDEO)
    order = inverse.reshape(-1)
    return torch.cat([per_frame[k] for k in order]), [per_frame[k].shape[0] for k in order]
