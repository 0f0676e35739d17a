"""Checkpoint weights: which files to read, and how their tensors fill the native model.

Tensors are read from safetensors (pickle `.bin` only when explicitly allowed) and renamed tensor by
tensor (`layouts`); every mismatch is a CheckpointError in the checkpoint's own names and shapes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from model_runtime.errors import CheckpointError
from model_runtime.loading import layouts
from model_runtime.loading.model_config import ParsedConfig, read_json

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def weight_files(path: Path, *, allow_pickle: bool) -> list[Path]:
    """The checkpoint's weight files: safetensors; pickle .bin files only when allowed."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
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


def _expected_source_tensors(
    model, parsed: ParsedConfig
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


def load_weights(model, path: Path, parsed: ParsedConfig, allow_pickle: bool) -> None:
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
