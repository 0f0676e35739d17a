"""Find and load an InternVL checkpoint (original or `-hf` layout) onto transformers' native classes.

No code from a checkpoint is ever executed: configs are read as JSON and mapped onto
`InternVLConfig`, weights are read from safetensors (pickle `.bin` only when explicitly allowed) and
renamed tensor by tensor (`layouts`). Every failure is a `CheckpointError` naming the file and what
was expected.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model_runtime import layouts
from model_runtime.config import EngineConfig
from model_runtime.errors import CheckpointError
from model_runtime.quantization import quantize_language_model
from model_runtime.templates import ConversationTemplate, get_template, template_for_hf_checkpoint

log = logging.getLogger(__name__)

ORIGINAL_ARCHS = {"InternVLChatModel"}
HF_ARCHS = {"InternVLForConditionalGeneration"}
# LLM kinds of the original layout and the native config type each maps onto.
LLM_KINDS = {
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "llama": "llama",
    "phi3": "phi3",
    "internlm2": "llama",
}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
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


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"missing file {path}: a checkpoint needs it")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot parse {path}: {exc}") from None


def detect_layout(config: dict, config_path: Path) -> str:
    archs = set(config.get("architectures") or [])
    if archs & ORIGINAL_ARCHS or config.get("model_type") == "internvl_chat":
        return "original"
    if archs & HF_ARCHS or config.get("model_type") == "internvl":
        return "hf"
    raise CheckpointError(
        f"{config_path}: unknown architecture {sorted(archs) or config.get('model_type')!r}; expected "
        f"{sorted(ORIGINAL_ARCHS | HF_ARCHS)} (InternVL checkpoints in the original or -hf layout)"
    )


def _llm_kind(llm_config: dict, config_path: Path) -> str:
    kind = llm_config.get("model_type")
    arch = (llm_config.get("architectures") or [""])[0]
    if kind not in LLM_KINDS:
        raise CheckpointError(
            f"{config_path}: unsupported LLM {kind or arch!r} in llm_config; supported: {sorted(LLM_KINDS)}"
        )
    return kind


def _text_config_from_original(llm: dict, kind: str):
    from transformers import AutoConfig

    drop = {
        "architectures",
        "auto_map",
        "_name_or_path",
        "attn_implementation",
        "torch_dtype",
        "transformers_version",
    }
    fields = {k: v for k, v in llm.items() if k not in drop}
    if kind == "internlm2":
        # InternLM2 is Llama with fused weights; only the names differ (see layouts).
        fields = {
            "vocab_size": llm["vocab_size"],
            "hidden_size": llm["hidden_size"],
            "intermediate_size": llm["intermediate_size"],
            "num_hidden_layers": llm["num_hidden_layers"],
            "num_attention_heads": llm["num_attention_heads"],
            "num_key_value_heads": llm.get("num_key_value_heads", llm["num_attention_heads"]),
            "max_position_embeddings": llm.get("max_position_embeddings", 32768),
            "rms_norm_eps": llm.get("rms_norm_eps", 1e-6),
            "rope_theta": llm.get("rope_theta", 10000.0),
            "rope_scaling": llm.get("rope_scaling"),
            "attention_bias": bool(llm.get("bias", False)),
            "hidden_act": llm.get("hidden_act", "silu"),
            "tie_word_embeddings": bool(llm.get("tie_word_embeddings", False)),
            "bos_token_id": llm.get("bos_token_id", 1),
            "eos_token_id": llm.get("eos_token_id", 2),
            "pad_token_id": llm.get("pad_token_id"),
        }
    fields.pop("model_type", None)
    return AutoConfig.for_model(LLM_KINDS[kind], **fields)


def _vision_config_from_original(vision: dict, image_size: int) -> dict:
    return {
        "hidden_size": vision["hidden_size"],
        "intermediate_size": vision["intermediate_size"],
        "num_hidden_layers": vision["num_hidden_layers"],
        "num_attention_heads": vision["num_attention_heads"],
        "image_size": image_size,
        "patch_size": vision.get("patch_size", 14),
        "attention_bias": bool(vision.get("qkv_bias", True)),
        "use_qk_norm": bool(vision.get("qk_normalization", False)),
        "norm_type": vision.get("norm_type", "layer_norm"),
        "layer_norm_eps": vision.get("layer_norm_eps", 1e-6),
        "hidden_act": vision.get("hidden_act", "gelu"),
        "use_mean_pooling": True,  # InternViT has no final norm; this makes the native one an Identity
    }


@dataclass(frozen=True)
class _Parsed:
    config: Any  # InternVLConfig
    layout: str
    llm_kind: str
    template_name: str | None
    min_tiles: int
    max_tiles: int
    use_thumbnail: bool


def parse_config(path: Path) -> _Parsed:
    """Read config.json (never executing code) and map it onto InternVLConfig."""
    from transformers import InternVLConfig

    config_path = path / "config.json"
    raw = _read_json(config_path)
    layout = detect_layout(raw, config_path)
    if layout == "hf":
        try:
            config = InternVLConfig.from_dict({k: v for k, v in raw.items() if k != "auto_map"})
        except Exception as exc:  # noqa: BLE001 - surface as a checkpoint problem
            raise CheckpointError(
                f"{config_path}: invalid InternVL config ({type(exc).__name__}: {exc})"
            ) from None
        kind = config.text_config.model_type
        return _Parsed(config, layout, kind, raw.get("template"), 1, raw.get("max_dynamic_patch", 12), True)
    for key in ("vision_config", "llm_config"):
        if not isinstance(raw.get(key), dict):
            raise CheckpointError(f"{config_path}: missing {key!r} (original InternVL layout)")
    if raw.get("ps_version", "v2") != "v2":
        raise CheckpointError(
            f"{config_path}: ps_version {raw.get('ps_version')!r} is not supported (expected 'v2')"
        )
    kind = _llm_kind(raw["llm_config"], config_path)
    image_size = raw.get("force_image_size") or raw["vision_config"].get("image_size", 448)
    text = _text_config_from_original(raw["llm_config"], kind)
    patch = raw["vision_config"].get("patch_size", 14)
    ratio = raw.get("downsample_ratio", 0.5)
    config = InternVLConfig(
        vision_config=_vision_config_from_original(raw["vision_config"], image_size),
        text_config=text.to_dict(),
        image_token_id=0,  # set from the tokenizer once it is loaded
        image_seq_length=int((image_size // patch) ** 2 * ratio**2),
        downsample_ratio=ratio,
        vision_feature_layer=raw.get("select_layer", -1),
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=bool(text.tie_word_embeddings),
    )
    if not raw.get("template"):
        raise CheckpointError(f"{config_path}: missing 'template' (original InternVL layout)")
    return _Parsed(
        config,
        layout,
        kind,
        raw["template"],
        int(raw.get("min_dynamic_patch", 1)),
        int(raw.get("max_dynamic_patch", 12)),
        bool(raw.get("use_thumbnail", True)),
    )


def weight_files(path: Path, *, allow_pickle: bool) -> list[Path]:
    """The checkpoint's weight files: safetensors; pickle .bin files only when allowed."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(f"{index}: shard file {path / missing[0]} is missing")
        return [path / s for s in shards]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    pickles = sorted(path.glob("pytorch_model*.bin"))
    if pickles and not allow_pickle:
        raise CheckpointError(
            f"{path}: only pickle weights ({pickles[0].name}) found; pickle files can execute code when "
            "loaded, so they are refused unless --allow-pickle is given (prefer a safetensors checkpoint)"
        )
    if pickles:
        return pickles
    raise CheckpointError(
        f"{path}: no weights found (expected model.safetensors or model.safetensors.index.json)"
    )


def _read_tensors(files: list[Path]) -> Iterator[tuple[Path, str, torch.Tensor]]:
    from safetensors import safe_open

    for file in files:
        if file.suffix == ".bin":
            state = torch.load(file, map_location="cpu", weights_only=True)
            for key, tensor in state.items():
                yield file, key, tensor
            continue
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                    yield file, key, handle.get_tensor(key)
        except Exception as exc:  # noqa: BLE001 - corrupt or truncated file
            raise CheckpointError(f"cannot read weights from {file}: {type(exc).__name__}") from None


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
    if requested != "auto":
        return requested
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def load_tokenizer(path: Path):
    """The checkpoint's tokenizer, without running any code it ships."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    try:
        # AutoTokenizer reads config.json and warns that `internvl_chat` is unknown: true but not useful.
        previous = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        finally:
            hf_logging.set_verbosity(previous)
    except Exception as exc:  # noqa: BLE001 - custom tokenizer classes (InternLM2) need a fallback
        if (path / "tokenizer.json").is_file():
            return PreTrainedTokenizerFast.from_pretrained(str(path))
        if (path / "tokenizer.model").is_file():
            try:
                from transformers import LlamaTokenizerFast

                # InternLM2's tokenizer is a SentencePiece BPE with Llama's conventions (adds <s>).
                return LlamaTokenizerFast.from_pretrained(str(path))
            except Exception as inner:  # noqa: BLE001
                raise CheckpointError(
                    f"{path / 'tokenizer.model'}: cannot convert the SentencePiece tokenizer "
                    f"({type(inner).__name__}); install the 'sentencepiece' extra"
                ) from None
        raise CheckpointError(
            f"{path}: no usable tokenizer (tokenizer.json or tokenizer.model): {exc}"
        ) from None


def _choose_template(engine: EngineConfig, parsed: _Parsed, path: Path) -> ConversationTemplate:
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


def _token_id(tokenizer, token: str, path: Path) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise CheckpointError(f"{path}: the tokenizer has no {token!r} token, which InternVL prompts need")
    return int(token_id)


def load_checkpoint(engine: EngineConfig) -> LoadedCheckpoint:
    """Load the model, tokenizer and template described by `engine`."""
    from transformers import InternVLForConditionalGeneration
    from transformers.initialization import no_init_weights

    path = resolve_checkpoint(engine.model, engine.revision, allow_pickle=engine.allow_pickle)
    parsed = parse_config(path)
    tokenizer = load_tokenizer(path)
    config = parsed.config
    config.image_token_id = _token_id(tokenizer, "<IMG_CONTEXT>", path)
    for token in ("<img>", "</img>"):
        _token_id(tokenizer, token, path)
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
    _load_weights(model, path, parsed, engine.allow_pickle)
    model.eval().requires_grad_(False)
    if engine.quantization:
        quantize_language_model(model, engine.quantization, dtype, device)
        if not engine.device_map:
            model.to(device)
    if engine.device_map:
        model = _dispatch(model, engine.device_map)

    text = config.text_config
    max_len = engine.max_model_len or min(int(text.max_position_embeddings), _MAX_MODEL_LEN_CAP)
    stop_ids = {_token_id(tokenizer, template.stop_str, path)}
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
        stop_token_ids=tuple(sorted(stop_ids)),
        max_model_len=max_len,
        device=device,
        dtype=dtype,
    )


def _expected_source_tensors(
    model, parsed: _Parsed
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Native tensors to fill, and the names and shapes the checkpoint's files must hold (meta tensors).

    Checking the file's own names and shapes (before any split or rename) lets every error speak
    the checkpoint's language: `mlp1.1.weight`, a fused `wqkv`, not our internal names.
    """
    native = dict(model.state_dict())
    shapes = {name: torch.empty(tensor.shape, device="meta") for name, tensor in native.items()}
    if parsed.layout == "original":
        source = layouts.native_to_original(shapes, llm_kind=parsed.llm_kind, config=parsed.config)
    else:
        source = shapes
    return native, source


def _describe(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _load_weights(model, path: Path, parsed: _Parsed, allow_pickle: bool) -> None:
    text = parsed.config.text_config
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    native, source = _expected_source_tensors(model, parsed)
    seen_source: set[str] = set()
    seen_native: set[str] = set()
    for file, key, tensor in _read_tensors(weight_files(path, allow_pickle=allow_pickle)):
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        name = key if parsed.layout == "original" else layouts.hf_legacy_to_native(key)
        if name not in source:
            raise CheckpointError(f"{file}: unexpected tensor {key!r}; not a weight of this InternVL config")
        if tuple(tensor.shape) != tuple(source[name].shape):
            raise CheckpointError(
                f"{file}: tensor {key!r} has shape {tuple(tensor.shape)}, but config.json implies "
                f"{tuple(source[name].shape)}"
            )
        if parsed.layout == "original":
            pairs = layouts.original_to_native(
                key,
                tensor,
                llm_kind=parsed.llm_kind,
                num_heads=heads,
                num_kv_heads=kv_heads,
                head_dim=head_dim,
            )
        else:
            pairs = iter([(name, tensor)])
        with torch.no_grad():
            for native_name, value in pairs:
                native[native_name].copy_(value)
                seen_native.add(native_name)
        seen_source.add(name)
    if sorted(set(native) - seen_native) == ["lm_head.weight"] and text.tie_word_embeddings:
        model.tie_weights()
        return
    missing = sorted(set(source) - seen_source)
    if missing:
        raise CheckpointError(f"{path}: checkpoint is missing weights: {_describe(missing)}")


def _dispatch(model, device_map: str):
    try:
        from accelerate import dispatch_model, infer_auto_device_map
    except ImportError:
        raise CheckpointError("device_map needs the 'accelerate' package (pip install accelerate)") from None
    if device_map != "auto":
        raise CheckpointError(f"unsupported device_map {device_map!r}; use 'auto' to spread over all GPUs")
    placement = infer_auto_device_map(model, no_split_module_classes=model._no_split_modules)
    return dispatch_model(model, device_map=placement)
