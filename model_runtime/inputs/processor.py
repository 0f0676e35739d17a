"""ChatInput -> Request: decode media into tiles, build the InternVL prompt, tokenize.

Runs on a thread pool beside the engine loop (decoding a 4K JPEG takes tens of milliseconds and
must not stall decoding). Everything here is CPU work and raises typed, client-safe errors.
"""

from __future__ import annotations

import dataclasses
import hashlib

from model_runtime.config import EngineConfig
from model_runtime.engine.sequence import ImageSlot, Request
from model_runtime.engine.vision_cache import VisionFeatureCache
from model_runtime.errors import InvalidRequestError, RuntimeErrorBase
from model_runtime.inputs.image import load_image
from model_runtime.inputs.prompt import build_prompt
from model_runtime.inputs.video import load_video
from model_runtime.loading.checkpoint import LoadedCheckpoint
from model_runtime.request import ChatInput, ImageInput, VideoInput
from model_runtime.sampling_params import SamplingParams


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class Processor:
    """Prepares requests for one loaded checkpoint."""

    def __init__(
        self, loaded: LoadedCheckpoint, config: EngineConfig, vision_cache: VisionFeatureCache | None = None
    ) -> None:
        self.loaded = loaded
        self.config = config
        self.vision_cache = vision_cache

    def _cached(self, key: str) -> ImageSlot | None:
        """An image slot whose features are already known: no decode, no tiling, no vision pass.

        The slot holds the features itself, so a later eviction from the cache cannot lose them.
        """
        features = self.vision_cache.peek(key) if self.vision_cache is not None else None
        if features is None:
            return None
        tiles = features.shape[0] // self.loaded.tokens_per_tile
        return ImageSlot(key=key, num_tiles=tiles, pixel_values=None, features=features)

    def clamp_tiles(self, requested: int | None) -> int:
        """Per-image tile limit: the model's default, never above the server ceiling."""
        if requested is None:
            return self.loaded.max_tiles
        return max(1, min(requested, self.config.max_tiles_ceiling))

    def _image(self, item: ImageInput) -> tuple[list[ImageSlot], list[int]]:
        max_tiles = self.clamp_tiles(item.max_tiles)
        key = f"{_digest(item.data)}:img:{max_tiles}"
        if (hit := self._cached(key)) is not None:
            return [hit], [hit.num_tiles]
        pixels = load_image(
            item.data,
            max_tiles=max_tiles,
            min_tiles=min(self.loaded.min_tiles, max_tiles),
            image_size=self.loaded.image_size,
            use_thumbnail=self.loaded.use_thumbnail,
            max_pixels=self.config.max_image_pixels,
            fast_jpeg_draft=self.config.fast_jpeg_draft,
            parallel=True,  # resizes in strips on every core, large JPEGs while they decode; same pixels
        )
        return [ImageSlot(key=key, num_tiles=pixels.shape[0], pixel_values=pixels)], [pixels.shape[0]]

    def _video(self, item: VideoInput) -> tuple[list[ImageSlot], list[int]]:
        frames = max(
            1, min(item.num_frames or self.config.frames_per_video, self.config.max_frames_per_video)
        )
        tiles = max(
            1, min(item.max_tiles_per_frame or self.config.tiles_per_frame, self.config.max_tiles_ceiling)
        )
        digest = _digest(item.data)
        keys = [f"{digest}:vid:{frames}:{tiles}:{item.bound}:{i}" for i in range(frames)]
        hits = [self._cached(key) for key in keys]
        if all(hit is not None for hit in hits):
            return hits, [hit.num_tiles for hit in hits]
        pixels, per_frame = load_video(
            item.data,
            num_frames=frames,
            max_tiles_per_frame=tiles,
            bound=item.bound,
            image_size=self.loaded.image_size,
            use_thumbnail=self.loaded.use_thumbnail,
            max_frames_in_file=self.config.max_video_frames_in_file,
            max_duration_s=self.config.max_video_duration_s,
            max_pixels_per_frame=self.config.max_image_pixels,
        )
        slots, offset = [], 0
        for key, count in zip(keys, per_frame, strict=True):
            slots.append(ImageSlot(key=key, num_tiles=count, pixel_values=pixels[offset : offset + count]))
            offset += count
        return slots, list(per_frame)

    def process(self, request_id: str, chat: ChatInput, params: SamplingParams) -> Request:
        """Decode media, build and tokenize the prompt; raises InvalidRequestError / MediaError."""
        if not chat.messages:
            raise InvalidRequestError("messages must contain at least one message", param="messages")
        slots: list[ImageSlot] = []
        media_tiles: list[list[int]] = []
        for i, message in enumerate(chat.messages):
            for j, part in enumerate(message.parts):
                if isinstance(part, str):
                    continue
                where = f"messages[{i}].content[{j}]"
                if message.role != "user":
                    raise InvalidRequestError(
                        f"images and videos are only accepted in user messages, not {message.role}",
                        param=where,
                    )
                try:
                    load = self._image if isinstance(part, ImageInput) else self._video
                    new_slots, tiles = load(part)
                except RuntimeErrorBase as exc:
                    exc.param = exc.param or where  # with several images, say which one was bad
                    raise
                slots.extend(new_slots)
                media_tiles.append(tiles)
        prompt = build_prompt(
            self.loaded.template,
            chat.messages,
            media_tiles,
            self.loaded.tokenizer,
            tokens_per_tile=self.loaded.tokens_per_tile,
            image_context_id=self.loaded.image_context_id,
        )
        for slot, (start, count) in zip(slots, prompt.image_spans, strict=True):
            slot.start, slot.num_tokens = start, count
            if slot.features is not None:
                slot.tiles_ready = slot.num_tiles
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.update(self.loaded.stop_token_ids)
        params = dataclasses.replace(params, extra_stop_token_ids=tuple(sorted(stop_ids)))
        return Request(
            request_id=request_id,
            prompt_ids=list(prompt.input_ids),
            params=params,
            max_tokens=params.max_tokens or 0,
            images=slots,
            image_token_count=prompt.image_token_count,
        )
