"""EngineConfig: everything the runtime needs to load a checkpoint and serve it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    """Settings of the model runtime; the server builds one from its Settings."""

    model: str
    revision: str | None = None
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    device: str = "auto"  # auto: cuda if available, else cpu
    device_map: str | None = None  # e.g. "auto" to spread a large model over GPUs (needs accelerate)
    quantization: str | None = None  # None, "8bit" or "4bit": the LLM's linear layers via bitsandbytes
    attn_implementation: str = "auto"  # auto: flash_attention_2 when installed, else sdpa
    allow_pickle: bool = False  # read .bin (pickle) weights only when explicitly allowed
    template: str | None = None  # override the conversation template
    seed: int = 0
    # Scheduling and memory.
    max_model_len: int | None = None  # default: the LLM's max_position_embeddings, capped at 32768
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192
    max_waiting: int = 256
    kv_cache_memory_gib: float | None = None  # default: a fraction of free device memory (CPU: 2 GiB)
    vision_cache_mib: int = 256
    # Media.
    max_tiles_per_image: int | None = None  # default: the checkpoint's max_dynamic_patch
    max_tiles_ceiling: int = 24
    frames_per_video: int = 8
    max_frames_per_video: int = 64
    tiles_per_frame: int = 1
    max_image_pixels: int = 50_000_000
    max_video_frames_in_file: int = 100_000
    max_video_duration_s: float = 3600.0
    preprocess_workers: int = 2
    # Opt-in: JPEG DCT-domain downscaling before tiling; faster, but pixels differ from the reference.
    fast_jpeg_draft: bool = False
