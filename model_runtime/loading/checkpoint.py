"""Find and load an InternVL checkpoint (original or `-hf` layout) onto transformers' native classes.

No code from a checkpoint is ever executed: configs are read as JSON and mapped onto
`InternVLConfig`, weights are read from safetensors (pickle `.bin` only when explicitly allowed) and
renamed tensor by tensor (`layouts`). Every failure is a `CheckpointError` naming the file and what
was expected.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model_runtime.config import EngineConfig
from model_runtime.errors import CheckpointError
from model_runtime.inputs.templates import ConversationTemplate, get_template, template_for_hf_checkpoint
from model_runtime.loading.model_config import ParsedConfig, parse_config
from model_runtime.loading.quantization import quantize_language_model
from model_runtime.loading.tokenizer import load_tokenizer, token_id
from model_runtime.loading.weights import load_weights

log = logging.getLogger(__name__)

_MAX_MODEL_LEN_CAP = 32768


@dataclass
class LoadedCheckpoint:
    """A model ready to serve, with everything needed to build its prompts."""

    model: Any  # InternVLForConditionalGeneration
    tokenizer: Any
    template: ConversationTemplate
    layout: str
    path: Path
    image_size: int
    tokens_per_tile: int
    min_tiles: int
    max_tiles: int
    use_thumbnail: bool
    image_context_id: int
    image_start_id: int  # <img>
    image_end_id: int  # </img>
    stop_token_ids: tuple[int, ...]
    max_model_len: int
    device: torch.device
    dtype: torch.dtype


def resolve_checkpoint(model: str, revision: str | None = None, *, allow_pickle: bool = False) -> Path:
    """A local directory as is; otherwise a hub id through the Hugging Face cache (offline when cached)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or model.startswith((".", "/", "~")):
        raise CheckpointError(f"checkpoint directory {model!r} does not exist or is not a directory")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]
    if allow_pickle:
        patterns.append("pytorch_model*.bin")
    try:
        return Path(snapshot_download(model, revision=revision, allow_patterns=patterns))
    except Exception as first:  # noqa: BLE001 - offline, gated or unknown id: try the cache alone
        try:
            return Path(
                snapshot_download(model, revision=revision, allow_patterns=patterns, local_files_only=True)
            )
        except Exception:  # noqa: BLE001
            raise CheckpointError(
                f"model {model!r} is neither a local directory nor available from the Hugging Face cache "
                f"(download failed: {type(first).__name__}); download it first with "
                f"`huggingface-cli download {model}` or pass a local path"
            ) from None


def pick_device_and_dtype(engine: EngineConfig) -> tuple[torch.device, torch.dtype]:
    if engine.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(engine.device)
    if engine.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        names = {
            "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16,
            "float16": torch.float16,
            "fp16": torch.float16,
            "float32": torch.float32,
            "fp32": torch.float32,
        }
        if engine.dtype not in names:
            raise CheckpointError(f"unknown dtype {engine.dtype!r}; choose one of {sorted(names)} or auto")
        dtype = names[engine.dtype]
    return device, dtype


def pick_attn_implementation(requested: str, device: torch.device) -> str:
    """The vision tower's attention kernel (the LM always runs the engine's paged attention).

    auto is PyTorch SDPA on every device: flash-attn has not been run by a GPU test here yet, and
    every kernel the server picks by itself must be one a test has run.
    """
    return "sdpa" if requested == "auto" else requested


def _choose_template(engine: EngineConfig, parsed: ParsedConfig, path: Path) -> ConversationTemplate:
    if engine.template:
        source, name = "the template setting", engine.template
    elif parsed.template_name:
        source, name = f"{path / 'config.json'} ('template')", parsed.template_name
    else:
        try:
            return get_template(template_for_hf_checkpoint(parsed.llm_kind))
        except CheckpointError:
            raise CheckpointError(
                f"{path / 'config.json'}: no InternVL template is known for text model type "
                f"{parsed.llm_kind!r}; choose one with the template setting"
            ) from None
    try:
        return get_template(name)
    except CheckpointError as exc:
        raise CheckpointError(f"unknown conversation template {name!r} from {source}: {exc}") from None


def load_checkpoint(engine: EngineConfig) -> LoadedCheckpoint:
    """Load the model, tokenizer and template described by `engine`."""
    from transformers import InternVLForConditionalGeneration
    from transformers.initialization import no_init_weights

    path = resolve_checkpoint(engine.model, engine.revision, allow_pickle=engine.allow_pickle)
    parsed = parse_config(path)
    tokenizer = load_tokenizer(path)
    config = parsed.config
    config.image_token_id = token_id(tokenizer, "<IMG_CONTEXT>", path)
    image_start, image_end = (token_id(tokenizer, token, path) for token in ("<img>", "</img>"))
    template = _choose_template(engine, parsed, path)
    device, dtype = pick_device_and_dtype(engine)
    config._attn_implementation = pick_attn_implementation(engine.attn_implementation, device)
    config.text_config._attn_implementation = config._attn_implementation
    config.vision_config._attn_implementation = config._attn_implementation

    # Quantized and multi-GPU loads assemble the model in host memory, then place it layer by layer.
    target = torch.device("cpu") if engine.device_map or engine.quantization else device
    # Allocate without random init (fast, and nothing else to overwrite), directly in the target dtype.
    with torch.device(target), no_init_weights():
        model = InternVLForConditionalGeneration._from_config(config, dtype=dtype)
    load_weights(model, path, parsed, engine.allow_pickle)
    model.eval().requires_grad_(False)
    if engine.quantization:
        quantize_language_model(model, engine.quantization, dtype, device)
        if not engine.device_map:
            model.to(device)
    if engine.device_map:
        model = _dispatch(model, engine.device_map)

    text = config.text_config
    max_len = engine.max_model_len or min(int(text.max_position_embeddings), _MAX_MODEL_LEN_CAP)
    stop_ids = {token_id(tokenizer, template.stop_str, path)}
    if tokenizer.eos_token_id is not None:
        stop_ids.add(int(tokenizer.eos_token_id))
    tokens_per_tile = int(config.image_seq_length)
    return LoadedCheckpoint(
        model=model,
        tokenizer=tokenizer,
        template=template,
        layout=parsed.layout,
        path=path,
        image_size=int(config.vision_config.image_size[0]),
        tokens_per_tile=tokens_per_tile,
        min_tiles=parsed.min_tiles,
        # The per-image default never exceeds the server's ceiling, whatever the checkpoint says.
        max_tiles=min(engine.max_tiles_per_image or parsed.max_tiles, engine.max_tiles_ceiling),
        use_thumbnail=parsed.use_thumbnail,
        image_context_id=config.image_token_id,
        image_start_id=image_start,
        image_end_id=image_end,
        stop_token_ids=tuple(sorted(stop_ids)),
        max_model_len=max_len,
        device=device,
        dtype=dtype,
    )


def _dispatch(model, device_map: str):
    try:
        from accelerate import dispatch_model, infer_auto_device_map
    except ImportError:
        raise CheckpointError("device_map needs the 'accelerate' package (pip install accelerate)") from None
    if device_map != "auto":
        raise CheckpointError(f"unsupported device_map {device_map!r}; use 'auto' to spread over all GPUs")
    placement = infer_auto_device_map(model, no_split_module_classes=model._no_split_modules)
    return dispatch_model(model, device_map=placement)
