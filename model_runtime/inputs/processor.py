"""ChatInput -> Request: decode media into tiles, build the InternVL prompt, tokenize.

Runs on worker threads beside the engine loop (decoding a 4K JPEG takes tens of milliseconds and
must not stall decoding), as separate jobs (plan, one decode per medium, finish) that the worker
schedules fairly between requests. Work is done cheapest first, so that a request that cannot be
served costs almost nothing:

1. every image's and video's header is read (sizes, frame count, duration: checked against the
   caps) and its tile count worked out from the size alone; images already in the vision cache
   need not even that;
2. a lower bound of the prompt's tokens (the image tokens exactly, the text at most the longest
   token's bytes per token) is checked against max_model_len and the request's max_tokens;
3. only then are pixels decoded and tiled, and the prompt built and tokenized (whose exact length
   the engine checks again).

Everything raises typed, client-safe errors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import time
from dataclasses import dataclass

from model_runtime.config import EngineConfig
from model_runtime.engine.sequence import ImageSlot, Request
from model_runtime.engine.vision_cache import VisionFeatureCache
from model_runtime.errors import InvalidRequestError, PromptTooLongError, RuntimeErrorBase
from model_runtime.inputs.heap import trim_heap
from model_runtime.inputs.image import load_image, probe_image
from model_runtime.inputs.prompt import PromptSpec, build_prompt, tokenize_prompt
from model_runtime.inputs.tiling import choose_grid
from model_runtime.inputs.tools import format_for
from model_runtime.inputs.video import load_video, probe_video, video_tiles_per_frame
from model_runtime.loading.checkpoint import LoadedCheckpoint
from model_runtime.loading.tokenizer import max_token_bytes, text_normalizer
from model_runtime.request import ChatInput, ImageInput, VideoInput
from model_runtime.sampling_params import SamplingParams
from model_runtime.structured.tokenizer import Vocabulary

_TRIM_AFTER_PIXELS = 8_000_000
_NORMALIZE_PIECE = 1 << 16  # characters normalized at once
_PIECE_SLACK_BYTES = 16


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass
class _Media:
    """One image or video of the request after step 1: its cache keys and tiles per slot."""

    item: ImageInput | VideoInput
    where: str
    keys: list[str]
    tiles: list[int]  # per slot (an image, or one video frame)
    max_tiles: int
    frames: int = 1
    cached: list[ImageSlot] | None = None
    pixels: int = 0  # decoded pixels (per frame for a video), from the header


@dataclass
class Plan:
    """A request that passed the cheap checks: what is left is decoding its media and tokenizing."""

    chat: ChatInput
    params: SamplingParams  # with its compiled constraint, if any
    salt: str
    media: list[_Media]


def _added_tokens(tokenizer) -> list[str]:
    """The texts the tokenizer keeps as single tokens (chat markers and other added tokens)."""
    if hasattr(tokenizer, "added_tokens"):
        return list(tokenizer.added_tokens())
    return list(tokenizer.get_added_vocab())


def _compact_json(text: str) -> str:
    """`text` re-serialized without whitespace if that is shorter (and it parses), else as is."""
    try:
        compact = json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False)
    except (ValueError, RecursionError):
        return text
    return compact if len(compact) < len(text) else text


class _Structured:
    """The served tokenizer as llguidance sees it, and the grammar cache; built on first use (a
    150k-token vocabulary takes about a second)."""

    def __init__(self, vocabulary: Vocabulary) -> None:
        from model_runtime.structured.grammar import GrammarCompiler

        self.tokenizer = vocabulary.ll
        self.compiler = GrammarCompiler(self.tokenizer)


class Processor:
    """Prepares requests for one loaded checkpoint."""

    def __init__(
        self,
        loaded: LoadedCheckpoint,
        config: EngineConfig,
        vision_cache: VisionFeatureCache | None = None,
        vocabulary: Vocabulary | None = None,
    ) -> None:
        self.loaded = loaded
        self.config = config
        self.vision_cache = vision_cache
        self.max_token_bytes = max_token_bytes(loaded.tokenizer)
        self.normalize = text_normalizer(loaded.tokenizer)
        self._structured: _Structured | None = None
        added = _added_tokens(loaded.tokenizer)
        self.tool_format = format_for(added)
        after = self.tool_format.stop_after_call
        self.tool_stop_ids = (loaded.tokenizer.convert_tokens_to_ids(after),) if after in added else ()
        self._structured_lock = threading.Lock()
        self.vocab_size = int(loaded.model.get_output_embeddings().weight.shape[0])
        self.vocabulary = vocabulary or Vocabulary(loaded.tokenizer, self.vocab_size, loaded.stop_token_ids)

    @property
    def structured(self) -> _Structured:
        with self._structured_lock:
            if self._structured is None:
                self._structured = _Structured(self.vocabulary)
            return self._structured

    def _constrain(self, chat: ChatInput, params: SamplingParams) -> SamplingParams:
        """Compile the request's output format into a constraint (a 400 if it cannot be honoured)
        and check its logit_bias ids against the vocabulary."""
        for token, _ in params.logit_bias:
            if token >= self.vocab_size:
                raise InvalidRequestError(
                    f"logit_bias names token {token}; the vocabulary has {self.vocab_size} tokens",
                    param="logit_bias",
                )
        if chat.tools and chat.tool_choice != "none":
            tool_format = self.tool_format
            stop = self.tool_stop_ids
            params = dataclasses.replace(
                params,
                skip_special_tokens=tool_format.skip_special_tokens,
                stop_token_ids=tuple(sorted({*params.stop_token_ids, *stop})),
            )
            if chat.calls_forced:
                tools = chat.tools
                if chat.tool_choice != "required":
                    tools = tuple(t for t in chat.tools if t.name == chat.tool_choice)
                    if not tools:
                        raise InvalidRequestError(
                            f"tool_choice names the function {chat.tool_choice!r}, which is not in tools",
                            param="tool_choice",
                        )
                grammar = tool_format.grammar(tools, parallel=chat.parallel_tool_calls)
                constraint = self.structured.compiler.lark(grammar, kind="tool_call", param="tools")
                return dataclasses.replace(params, constraint=constraint)
        fmt = chat.output_format
        if fmt is None:
            return params
        compiler = self.structured.compiler
        if fmt.kind == "json_object":
            constraint = compiler.json_object()
        else:
            constraint = compiler.json_schema(
                fmt.schema or {}, strict=fmt.strict, param="response_format.json_schema.schema"
            )
        return dataclasses.replace(params, constraint=constraint)

    # -- step 1: headers ---------------------------------------------------------------------------

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

    def _tiles(self, width: int, height: int, max_tiles: int, min_tiles: int) -> int:
        loaded = self.loaded
        cols, rows = choose_grid(
            width, height, min_tiles=min_tiles, max_tiles=max_tiles, image_size=loaded.image_size
        )
        return cols * rows + int(loaded.use_thumbnail and cols * rows != 1)

    def _plan_image(self, item: ImageInput, where: str, salt: str) -> _Media:
        max_tiles = self.clamp_tiles(item.max_tiles)
        key = f"{salt}{_digest(item.data)}:img:{max_tiles}"
        if (hit := self._cached(key)) is not None:
            return _Media(item, where, [key], [hit.num_tiles], max_tiles, cached=[hit])
        width, height = probe_image(item.data, max_pixels=self.config.max_image_pixels)
        tiles = self._tiles(width, height, max_tiles, min(self.loaded.min_tiles, max_tiles))
        return _Media(item, where, [key], [tiles], max_tiles, pixels=width * height)

    def _plan_video(self, item: VideoInput, where: str, salt: str) -> _Media:
        config = self.config
        frames = max(1, min(item.num_frames or config.frames_per_video, config.max_frames_per_video))
        max_tiles = max(1, min(item.max_tiles_per_frame or config.tiles_per_frame, config.max_tiles_ceiling))
        digest = _digest(item.data)
        keys = [f"{salt}{digest}:vid:{frames}:{max_tiles}:{item.bound}:{i}" for i in range(frames)]
        hits = [self._cached(key) for key in keys]
        if all(hit is not None for hit in hits):
            return _Media(item, where, keys, [h.num_tiles for h in hits], max_tiles, frames, cached=hits)  # type: ignore[union-attr]
        info = probe_video(
            item.data,
            max_frames_in_file=config.max_video_frames_in_file,
            max_duration_s=config.max_video_duration_s,
            max_pixels_per_frame=config.max_image_pixels,
        )
        per_frame = video_tiles_per_frame(info, max_tiles, self.loaded.image_size, self.loaded.use_thumbnail)
        return _Media(
            item, where, keys, [per_frame] * frames, max_tiles, frames, pixels=info.width * info.height
        )

    def _plan(self, chat: ChatInput, salt: str) -> list[_Media]:
        planned: list[_Media] = []
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
                    plan = self._plan_image if isinstance(part, ImageInput) else self._plan_video
                    planned.append(plan(part, where, salt))
                except RuntimeErrorBase as exc:
                    exc.param = exc.param or where  # with several images, say which one was bad
                    raise
        return planned

    # -- step 2: the token budget ------------------------------------------------------------------

    def _check_lower_bound(self, chat: ChatInput, media: list[_Media], params: SamplingParams) -> None:
        """Refuse a prompt that cannot fit before anything is decoded or tokenized.

        Image tokens are exact; a text is at least (its bytes after the tokenizer's normalization)
        / (the longest token's bytes) tokens. The raw bytes decide first; only a prompt they say
        is too long pays for normalizing (which may shorten it: collapsed spaces, dropped control
        characters), so that nothing that fits is ever refused.
        """
        image_tokens = sum(self.loaded.tokens_per_tile * t for m in media for t in m.tiles)
        texts = [p for m in chat.messages for p in m.parts if isinstance(p, str)]
        limit = self.loaded.max_model_len
        wanted = params.max_tokens or 1
        if isinstance(chat.prompt, tuple):
            if len(chat.prompt) + wanted > limit:
                raise PromptTooLongError(
                    f"the prompt has {len(chat.prompt)} tokens; with max_tokens {wanted} that exceeds "
                    f"max_model_len {limit}",
                    param="prompt",
                )
            return
        if chat.prompt is not None:
            texts.append(chat.prompt)
        # Tool calls in the history and the tool list are rendered into the prompt too; JSON may be
        # re-serialized there, so each counts at its most compact.
        texts += [_compact_json(c.arguments) for m in chat.messages for c in m.tool_calls]
        if chat.tool_choice != "none":
            for tool in chat.tools:
                texts += [tool.name, tool.description or ""]
                if tool.parameters is not None:
                    texts.append(json.dumps(tool.parameters, separators=(",", ":"), ensure_ascii=False))

        def fits(text_bytes: int) -> bool:
            return image_tokens + text_bytes // self.max_token_bytes + wanted <= limit

        if fits(sum(len(t.encode("utf-8")) for t in texts)):
            return
        text_bytes = sum(self._normalized_bytes(t) for t in texts)
        if fits(text_bytes):
            return
        at_least = image_tokens + text_bytes // self.max_token_bytes
        images = f", {image_tokens} of them image tokens" if image_tokens else ""
        raise PromptTooLongError(
            f"the prompt has at least {at_least} tokens{images}; with max_tokens {wanted} that exceeds "
            f"max_model_len {limit}",
            param="messages",
        )

    def _normalized_bytes(self, text: str) -> int:
        """UTF-8 bytes of `text` after the tokenizer's normalization, at most this many.

        Normalized in pieces: a tokenizer's normalizer keeps per-character alignments (tens of
        bytes each), so a megabyte at once would cost hundreds of megabytes. A cut can make the
        pieces' sum exceed the whole's by a few bytes (a combining sequence or a run of spaces
        split in two, a dummy-prefix space per piece), which the slack takes off again.
        """
        if len(text) <= _NORMALIZE_PIECE:
            return len(self.normalize(text).encode("utf-8"))
        total = pieces = 0
        for start in range(0, len(text), _NORMALIZE_PIECE):
            total += len(self.normalize(text[start : start + _NORMALIZE_PIECE]).encode("utf-8"))
            pieces += 1
        return max(0, total - _PIECE_SLACK_BYTES * (pieces - 1))

    # -- step 3: pixels, prompt, tokens ------------------------------------------------------------

    def plan(self, chat: ChatInput, params: SamplingParams, cache_salt: str = "") -> Plan:
        """Steps 1 and 2: read every medium's header and check the token lower bound; cheap."""
        if not chat.messages and chat.prompt is None:
            raise InvalidRequestError("messages must contain at least one message", param="messages")
        salt = f"{hashlib.blake2b(cache_salt.encode(), digest_size=8).hexdigest()}:" if cache_salt else ""
        params = self._constrain(chat, params)
        media = self._plan(chat, salt)
        self._check_lower_bound(chat, media, params)
        return Plan(chat, params, salt, media)

    def decode(self, media: _Media) -> list[ImageSlot]:
        """One image's or video's pixels, tiled; the costly part, one job per medium."""
        try:
            return self._decode(media)
        except RuntimeErrorBase as exc:
            exc.param = exc.param or media.where
            raise
        finally:
            if media.pixels >= _TRIM_AFTER_PIXELS:
                trim_heap()  # the full-resolution pixels are freed by now; give their pages back

    def _decode(self, media: _Media) -> list[ImageSlot]:
        if media.cached is not None:
            return media.cached
        loaded, config = self.loaded, self.config
        timeout = config.media_decode_timeout_s
        deadline = None if timeout is None else time.monotonic() + timeout
        if isinstance(media.item, ImageInput):
            pixels = load_image(
                media.item.data,
                max_tiles=media.max_tiles,
                min_tiles=min(loaded.min_tiles, media.max_tiles),
                image_size=loaded.image_size,
                use_thumbnail=loaded.use_thumbnail,
                max_pixels=config.max_image_pixels,
                fast_jpeg_draft=config.fast_jpeg_draft,
                parallel=True,  # resizes in strips on every core; same pixels
                deadline=deadline,
            )
            return [ImageSlot(key=media.keys[0], num_tiles=pixels.shape[0], pixel_values=pixels)]
        pixels, per_frame = load_video(
            media.item.data,
            num_frames=media.frames,
            max_tiles_per_frame=media.max_tiles,
            bound=media.item.bound,
            image_size=loaded.image_size,
            use_thumbnail=loaded.use_thumbnail,
            max_frames_in_file=config.max_video_frames_in_file,
            max_duration_s=config.max_video_duration_s,
            max_pixels_per_frame=config.max_image_pixels,
            deadline=deadline,
        )
        slots, offset = [], 0
        for key, count in zip(media.keys, per_frame, strict=True):
            slots.append(ImageSlot(key=key, num_tiles=count, pixel_values=pixels[offset : offset + count]))
            offset += count
        return slots

    def finish(self, request_id: str, plan: Plan, decoded: list[list[ImageSlot]]) -> Request:
        """The prompt built and tokenized around the decoded media (one list of slots per medium)."""
        loaded, params = self.loaded, plan.params
        slots = [slot for group in decoded for slot in group]
        chat = plan.chat
        prompt = (
            self._completion_prompt(chat.prompt)
            if chat.prompt is not None
            else build_prompt(
                loaded.template,
                chat.messages,
                [[slot.num_tiles for slot in group] for group in decoded],
                loaded.tokenizer,
                tokens_per_tile=loaded.tokens_per_tile,
                image_context_id=loaded.image_context_id,
                image_start_id=loaded.image_start_id,
                image_end_id=loaded.image_end_id,
                tools=chat.tools if chat.tool_choice != "none" else (),
                tool_format=self.tool_format,
            )
        )
        for slot, (start, count) in zip(slots, prompt.image_spans, strict=True):
            slot.start, slot.num_tokens = start, count
            if slot.features is not None:
                slot.tiles_ready = slot.num_tiles
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.update(loaded.stop_token_ids)
        params = dataclasses.replace(params, extra_stop_token_ids=tuple(sorted(stop_ids)))
        request = Request(
            request_id=request_id,
            prompt_ids=list(prompt.input_ids),
            params=params,
            max_tokens=params.max_tokens or 0,
            images=slots,
            image_token_count=prompt.image_token_count,
            cache_root=plan.salt.encode(),
        )
        if params.logprobs:
            self.vocabulary.warm()  # here, not on the engine thread, which reads each token's bytes
        if params.constraint is not None:
            tokenizer = self.structured.tokenizer
            for seq in request.seqs:  # each choice follows the grammar on its own
                seq.matcher = params.constraint.matcher(tokenizer)
                if seq.matcher.is_error():
                    raise InvalidRequestError(
                        f"the output constraint cannot be used: {seq.matcher.get_error()[:400]}",
                        param="response_format",
                    )
        return request

    def _completion_prompt(self, prompt: str | tuple[int, ...]) -> PromptSpec:
        """A legacy-completions prompt as it is: text tokenized with the tokenizer's defaults (a BOS
        where the tokenizer adds one, as vLLM does), or the client's token ids. Image marker ids
        would point the runner at features that do not exist: refused either way."""
        loaded = self.loaded
        markers = {loaded.image_start_id: 0, loaded.image_end_id: 0}
        if isinstance(prompt, str):
            ids = tokenize_prompt(
                loaded.tokenizer,
                prompt,
                image_context_id=loaded.image_context_id,
                expected_image_tokens=0,
                marker_counts=markers,
            )
        else:
            ids = list(prompt)
            known = len(loaded.tokenizer)  # logit rows past the tokenizer (a padded lm_head) are no text
            bad = next(
                (t for t in ids if not 0 <= t < known or t in markers or t == loaded.image_context_id),
                None,
            )
            if bad is not None:
                raise InvalidRequestError(
                    f"prompt token {bad} is not a text token of this model (the tokenizer has {known} "
                    "ids; image marker ids are not allowed)",
                    param="prompt",
                )
        if not ids:
            raise InvalidRequestError("the prompt must have at least one token", param="prompt")
        text = prompt if isinstance(prompt, str) else ""
        return PromptSpec(text=text, input_ids=tuple(ids), image_token_count=0, slot_tiles=(), image_spans=())

    def process(
        self, request_id: str, chat: ChatInput, params: SamplingParams, *, cache_salt: str = ""
    ) -> Request:
        """plan, decode and finish in turn on the calling thread; raises InvalidRequestError,
        MediaError, MediaTooLargeError or PromptTooLongError. `cache_salt` keeps this request's
        images and prefixes apart from other tenants' in the caches."""
        plan = self.plan(chat, params, cache_salt=cache_salt)
        return self.finish(request_id, plan, [self.decode(media) for media in plan.media])
