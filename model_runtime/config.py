"""EngineConfig: everything the runtime needs to load a checkpoint and serve it.

EngineOptions holds every engine option but the checkpoint, each with its default and the one-line
doc that `internvl-serve --help`, the YAML file and the README show: server.settings.Settings
inherits them, so the server and the runtime cannot disagree on a name or a default.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class EngineOptions(BaseModel):
    """The engine's options (all but `model`); field names are also the server's setting names."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    revision: str | None = None
    """hub revision (branch, tag or commit) of the checkpoint"""
    dtype: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU), bfloat16, float16 or float32"""
    device: str = "auto"
    """auto (cuda if available), cuda, cuda:N or cpu"""
    quantization: Literal["8bit", "4bit"] | None = None
    """8bit or 4bit weights for the LLM's linear layers (bitsandbytes; the 'quant' extra); None = off"""
    device_map: str | None = None
    """e.g. 'auto' to spread a large model over GPUs (needs accelerate)"""
    attn_implementation: str = "auto"
    """vision tower's attention: auto (= sdpa), sdpa, eager or flash_attention_2 (the LM: paged SDPA)"""
    allow_pickle: bool = False
    """read .bin (pickle) weights; off because unpickling can run code"""
    template: str | None = None
    """override the checkpoint's conversation template"""
    seed: int = 0
    """engine seed for requests without one"""
    max_model_len: int | None = None
    """context length; None = the model's (at most 32768), cut to what the KV cache holds"""
    max_num_seqs: int = 64
    """sequences generated together"""
    max_num_batched_tokens: int = 8192
    """tokens per engine step (prefill budget)"""
    block_size: int = 16
    """tokens per KV-cache block"""
    enable_prefix_caching: bool = True
    """reuse the keys and values of prompt prefixes computed before (chat history, shared system prompts)"""
    step_time_target_ms: float | None = None
    """ms a step with prefill or image work may take; None = 3x the decode step while streams decode
    (at least 45 ms on CPU, 30 on CUDA), else 250 ms on CPU, 100 on CUDA"""
    max_waiting: int = 256
    """queued requests before new ones get 503"""
    kv_cache_memory_gib: float | None = None
    """KV cache size; None = a fraction of free device memory (CPU: 2 GiB)"""
    vision_cache_mib: int = 256
    """cache of image embeddings, MiB"""
    max_tiles_per_image: int | None = None
    """tiles per image for detail=high; None = the checkpoint's max_dynamic_patch"""
    max_tiles_ceiling: int = 24
    """hard ceiling on tiles per image, whatever the checkpoint says"""
    frames_per_video: int = 8
    """frames sampled per video by default"""
    max_frames_per_video: int = 64
    """ceiling on frames sampled per video (requests asking more are clamped)"""
    tiles_per_frame: int = 1
    """tiles per video frame by default"""
    max_image_pixels: int = 50_000_000
    """largest decoded image, in pixels (decompression-bomb guard)"""
    max_video_frames_in_file: int = 100_000
    """videos declaring more frames are refused before decoding"""
    max_video_duration_s: float = 3600.0
    """videos longer than this are refused before decoding"""
    preprocess_workers: int = 2
    """threads decoding and tiling media (one request uses at most half of them)"""
    media_decode_timeout_s: float | None = 30.0
    """seconds one image or video may take to decode and tile before its request is refused; None = off"""
    fast_jpeg_draft: bool = False
    """decode large JPEGs at reduced size (~3x faster for 4000x3000; pixels deviate up to ~5/255)"""


class EngineConfig(EngineOptions):
    """Settings of the model runtime; the server builds one from its Settings."""

    model: str
    """checkpoint directory or hub id"""
