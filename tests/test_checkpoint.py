"""Checkpoint loading: both layouts give the same model, bad checkpoints give clear errors, no code runs.

Every checkpoint here is a tiny random InternVL written by `model_runtime.loading.tiny` (session fixtures in
conftest); error cases edit a copy of one.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from model_runtime.config import EngineConfig
from model_runtime.errors import CheckpointError
from model_runtime.loading import layouts
from model_runtime.loading.checkpoint import LoadedCheckpoint, load_checkpoint
from model_runtime.loading.tiny import write_tiny_checkpoint

LLMS = ("qwen2", "internlm2")
Checkpoints = dict[tuple[str, str], Path]
Loaded = Callable[[str, str], LoadedCheckpoint]


def load(path: Path | str, **kwargs: object) -> LoadedCheckpoint:
    return load_checkpoint(EngineConfig(model=str(path), device="cpu", dtype="float32", **kwargs))


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def edit_weights(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    file = path / "model.safetensors"
    state = load_file(str(file))
    edit(state)
    save_file(state, str(file), metadata={"format": "pt"})


def expect_error(path: Path | str, *fragments: str, **kwargs: object) -> str:
    """Load `path`, expect CheckpointError, check every fragment is in the message; return it."""
    with pytest.raises(CheckpointError) as info:
        load(path, **kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def prompt_ids(loaded: LoadedCheckpoint, tiles: int) -> torch.Tensor:
    """A chat prompt with one image of `tiles` tiles (none when 0), as the runtime would build it."""
    image = "<img>" + "<IMG_CONTEXT>" * (loaded.tokens_per_tile * tiles) + "</img>\n" if tiles else ""
    text = f"<|im_start|>user\n{image}Describe the image.<|im_end|>\n<|im_start|>assistant\n"
    ids = loaded.tokenizer(text, return_tensors="pt")["input_ids"]  # [1, L]
    assert int((ids == loaded.image_context_id).sum()) == loaded.tokens_per_tile * tiles
    return ids


def random_pixels(tiles: int, seed: int = 0) -> torch.Tensor | None:
    if not tiles:
        return None
    return torch.randn(tiles, 3, 448, 448, generator=torch.Generator().manual_seed(seed))


# -- both layouts are the same model -----------------------------------------------------------------


@pytest.mark.parametrize("llm", LLMS)
def test_layouts_load_identical_weights(loaded: Loaded, llm: str) -> None:
    original = loaded(llm, "original").model.state_dict()
    native = loaded(llm, "hf").model.state_dict()
    assert original.keys() == native.keys()
    different = [k for k in native if not torch.equal(original[k], native[k])]
    assert different == []


@pytest.mark.parametrize("tiles", [0, 2], ids=["text", "image"])
@pytest.mark.parametrize("llm", LLMS)
def test_layouts_give_identical_logits(loaded: Loaded, llm: str, tiles: int) -> None:
    original, native = loaded(llm, "original"), loaded(llm, "hf")
    ids = prompt_ids(original, tiles)
    assert torch.equal(ids, prompt_ids(native, tiles))
    pixels = random_pixels(tiles)
    with torch.no_grad():
        a = original.model(input_ids=ids, pixel_values=pixels).logits  # [1, L, V]
        b = native.model(input_ids=ids, pixel_values=pixels).logits
    assert torch.equal(a, b)
    if tiles:  # the image really goes through the vision tower: other pixels, other logits
        with torch.no_grad():
            c = native.model(input_ids=ids, pixel_values=random_pixels(tiles, seed=1)).logits
        assert not torch.allclose(b, c)


@pytest.mark.parametrize("tiles", [0, 2], ids=["text", "image"])
@pytest.mark.parametrize("llm", LLMS)
def test_layouts_give_identical_greedy_generation(loaded: Loaded, llm: str, tiles: int) -> None:
    original, native = loaded(llm, "original"), loaded(llm, "hf")
    ids = prompt_ids(original, tiles)
    # transformers' generate() cannot take pixel_values=None, so text-only passes none.
    images = {"pixel_values": random_pixels(tiles)} if tiles else {}
    outputs = [
        ckpt.model.generate(ids, **images, do_sample=False, max_new_tokens=16) for ckpt in (original, native)
    ]
    assert outputs[0].shape[1] > ids.shape[1]
    assert outputs[0].tolist() == outputs[1].tolist()


def test_pickle_weights_load_only_when_allowed(
    tiny_checkpoints: Checkpoints, loaded: Loaded, tmp_path: Path
) -> None:
    path = copy_checkpoint(tiny_checkpoints[("qwen2", "original")], tmp_path / "ckpt")
    state = load_file(str(path / "model.safetensors"))
    (path / "model.safetensors").unlink()
    torch.save(state, path / "pytorch_model.bin")
    message = expect_error(path, "pytorch_model.bin", "pickle")
    assert str(path) in message
    from_pickle = load(path, allow_pickle=True).model.state_dict()
    reference = loaded("qwen2", "original").model.state_dict()
    assert all(torch.equal(from_pickle[k], reference[k]) for k in reference)


def shard(path: Path) -> dict[str, str]:
    """Split model.safetensors into two shards with an index, as large checkpoints ship; the weight map."""
    state = load_file(str(path / "model.safetensors"))
    (path / "model.safetensors").unlink()
    keys = sorted(state)
    weight_map = {}
    for number, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :]), start=1):
        name = f"model-0000{number}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def test_sharded_safetensors_load(tiny_checkpoints: Checkpoints, loaded: Loaded, tmp_path: Path) -> None:
    path = copy_checkpoint(tiny_checkpoints[("internlm2", "original")], tmp_path / "ckpt")
    shard(path)
    sharded = load(path).model.state_dict()
    reference = loaded("internlm2", "original").model.state_dict()
    assert all(torch.equal(sharded[k], reference[k]) for k in reference)


def test_missing_shard(tiny_checkpoints: Checkpoints, tmp_path: Path) -> None:
    path = copy_checkpoint(tiny_checkpoints[("qwen2", "original")], tmp_path / "ckpt")
    shard(path)
    (path / "model-00002-of-00002.safetensors").unlink()
    expect_error(path, str(path / "model.safetensors.index.json"), "model-00002-of-00002.safetensors")


# -- layouts ---------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    kv_heads=st.integers(1, 4),
    groups=st.integers(1, 4),
    head_dim=st.integers(1, 5),
    rest=st.sampled_from([(), (3,), (2, 2)]),
)
def test_wqkv_split_and_fuse_round_trip(kv_heads: int, groups: int, head_dim: int, rest: tuple) -> None:
    heads = kv_heads * groups
    dims = dict(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim)
    fused = torch.randn((heads + 2 * kv_heads) * head_dim, *rest)
    q, k, v = layouts.split_internlm2_wqkv(fused, **dims)
    assert q.shape == (heads * head_dim, *rest)
    assert k.shape == v.shape == (kv_heads * head_dim, *rest)
    assert torch.equal(layouts.fuse_internlm2_wqkv(q, k, v, **dims), fused)
    again = layouts.split_internlm2_wqkv(layouts.fuse_internlm2_wqkv(q, k, v, **dims), **dims)
    assert all(torch.equal(x, y) for x, y in zip(again, (q, k, v), strict=True))


def test_wqkv_split_groups_q_heads_then_k_then_v_per_kv_head() -> None:
    # 4 q heads sharing 2 kv heads (2 per group), head_dim 3: per kv group g the fused rows are
    # [q head 2g, q head 2g+1, k head g, v head g], 3 rows each.
    heads, kv_heads, head_dim = 4, 2, 3
    rows = torch.arange((heads + 2 * kv_heads) * head_dim)
    wqkv = rows[:, None].expand(-1, 5).clone()  # row r holds r in every column
    q, k, v = layouts.split_internlm2_wqkv(wqkv, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim)
    assert q[:, 0].tolist() == [0, 1, 2, 3, 4, 5, 12, 13, 14, 15, 16, 17]
    assert k[:, 0].tolist() == [6, 7, 8, 18, 19, 20]
    assert v[:, 0].tolist() == [9, 10, 11, 21, 22, 23]
    bias_q, bias_k, bias_v = layouts.split_internlm2_wqkv(
        rows, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim
    )
    assert (bias_q.tolist(), bias_k.tolist(), bias_v.tolist()) == (
        q[:, 0].tolist(),
        k[:, 0].tolist(),
        v[:, 0].tolist(),
    )


@pytest.mark.parametrize("llm", LLMS)
def test_native_to_original_inverts_original_to_native(loaded: Loaded, llm: str) -> None:
    model = loaded(llm, "hf").model
    native = model.state_dict()
    text = model.config.text_config
    original = layouts.native_to_original(native, llm_kind=llm, config=model.config)
    assert not any(k.startswith("model.") for k in original)
    back: dict[str, torch.Tensor] = {}
    for key, tensor in original.items():
        for name, part in layouts.original_to_native(
            key,
            tensor,
            llm_kind=llm,
            num_heads=text.num_attention_heads,
            num_kv_heads=text.num_key_value_heads,
            head_dim=text.hidden_size // text.num_attention_heads,
        ):
            assert name not in back
            back[name] = part
    assert back.keys() == native.keys()
    assert all(torch.equal(back[k], native[k]) for k in native)


# -- errors ----------------------------------------------------------------------------------------


def test_missing_config(tiny_checkpoints: Checkpoints, tmp_path: Path) -> None:
    path = copy_checkpoint(tiny_checkpoints[("qwen2", "original")], tmp_path / "ckpt")
    (path / "config.json").unlink()
    expect_error(path, str(path / "config.json"), "missing")


def test_unparseable_config(tiny_checkpoints: Checkpoints, tmp_path: Path) -> None:
    path = copy_checkpoint(tiny_checkpoints[("qwen2", "original")], tmp_path / "ckpt")
    (path / "config.json").write_text("{")
    expect_error(path, str(path / "config.json"))


def test_unknown_architecture(tiny_checkpoints: Checkpoints, tmp_path: Path) -> None:
    path = copy_checkpoint(tiny_checkpoints[("qwen2", "hf")], tmp_path / "ckpt")
    (path / "config.json").write_text(
        json.dumps({"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava"})
    )
    expect_error(
        path,
        str(path / "config.json"),
        "LlavaForConditionalGeneration",
        "InternVLChatModel",
        "InternVLForConditionalGeneration",
    )


def test_original_layout_without_llm_config(tiny_checkpoints: Checkpoints, tmp_path: Path) -> None:
    path = copy_checkpoint(tiny_checkpoints[("qwen2", "original")], tmp_path / "ckpt")
    edit_json(path / "config.json", lambda c: c.pop("llm_config"))
    expect_error(path, str(path / "config.json"), "llm_config")


def test_unsupported_llm_type(tiny_checkpoints: Checkpoints, tmp_path: Path) -> None:
    path = copy_checkpoint(tiny_checkpoints[("qwen2", "original")], tmp_path / "ckpt")

    def edit(config: dict) -> None:
        config["llm_config"].update(model_type="mamba", architectures=["MambaForCausalLM"])

    edit_json(path / "config.json", edit)
    expect_error(path, str(path / "config.json"), "mamba", "qwen2", "internlm2")


def test_unknown_template_in_config(tiny_checkpoints: Checkpoints, tmp_path: Path) -> None:
    path = copy_checkpoint(tiny_checkpoints[("qwen2", "original")], tmp_path / "ckpt")
    edit_json(path / "config.json", lambda c: c.update(template="vicuna_v1.1"))
    expect_error(path, str(path / "config.json"), "vicuna_v1.1")


def test_missing_weights_file(tiny_checkpoints: Checkpoints, tmp_path: Path) -> None:
    path = copy_checkpoint(tiny_checkpoints[("qwen2", "original")], tmp_path / "ckpt")
    (path / "model.safetensors").unlink()
    expect_error(path, str(path), "model.safetensors")


def test_truncated_weights_file(tiny_checkpoints: Checkpoints, tmp_path: Path) -> None:
    path = copy_checkpoint(tiny_checkpoints[("qwen2", "original")], tmp_path / "ckpt")
    file = path / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    expect_error(path, str(file))


WRONG_SHAPES = [
    ("qwen2", "original", "mlp1.1.weight"),
    ("qwen2", "hf", "model.multi_modal_projector.linear_1.weight"),
    ("qwen2", "original", "vision_model.encoder.layers.0.attn.qkv.weight"),  # fused, split in 3
    ("internlm2", "original", "language_model.model.layers.0.attention.wqkv.weight"),  # grouped split
    ("internlm2", "original", "language_model.model.layers.1.feed_forward.w2.weight"),
]


@pytest.mark.parametrize(("llm", "layout", "key"), WRONG_SHAPES)
def test_tensor_with_wrong_shape(
    tiny_checkpoints: Checkpoints, tmp_path: Path, llm: str, layout: str, key: str
) -> None:
    path = copy_checkpoint(tiny_checkpoints[(llm, layout)], tmp_path / "ckpt")
    shapes: dict[str, tuple[int, ...]] = {}

    def edit(state: dict[str, torch.Tensor]) -> None:
        expected = tuple(state[key].shape)
        bad = (expected[0] + 4, *expected[1:])
        state[key] = torch.zeros(bad)
        shapes.update(expected=expected, bad=bad)

    edit_weights(path, edit)
    expect_error(path, str(path / "model.safetensors"), key, str(shapes["bad"]), str(shapes["expected"]))


MISSING = [
    ("qwen2", "hf", "model.multi_modal_projector.linear_1.weight"),
    ("qwen2", "original", "mlp1.1.weight"),
    ("internlm2", "original", "language_model.model.layers.0.attention.wqkv.weight"),
]


@pytest.mark.parametrize(("llm", "layout", "key"), MISSING)
def test_missing_tensor(
    tiny_checkpoints: Checkpoints, tmp_path: Path, llm: str, layout: str, key: str
) -> None:
    path = copy_checkpoint(tiny_checkpoints[(llm, layout)], tmp_path / "ckpt")
    edit_weights(path, lambda state: state.pop(key))
    # Named as it is spelled in the user's checkpoint, so it can be looked up there.
    expect_error(path, str(path), key)


@pytest.mark.parametrize("layout", ["original", "hf"])
def test_unexpected_extra_tensor(tiny_checkpoints: Checkpoints, tmp_path: Path, layout: str) -> None:
    path = copy_checkpoint(tiny_checkpoints[("qwen2", layout)], tmp_path / "ckpt")
    edit_weights(path, lambda state: state.update({"model.extra_head.weight": torch.zeros(2, 2)}))
    expect_error(path, str(path / "model.safetensors"), "model.extra_head.weight", "unexpected")


def test_nonexistent_local_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-checkpoint"
    expect_error(missing, str(missing))


def test_uncached_hub_id_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # huggingface_hub reads these once at import; patch the constants as well as the environment.
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    expect_error("OpenGVLab/InternVL2-1B", "OpenGVLab/InternVL2-1B")


def test_cached_hub_id_loads_offline(
    tiny_checkpoints: Checkpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The Hugging Face cache layout: hub/models--org--name/{refs/main, snapshots/<commit>/...}.
    home = tmp_path / "hf-home"
    repo = home / "hub" / "models--OpenGVLab--InternVL-tiny"
    commit = "0" * 40
    shutil.copytree(tiny_checkpoints[("qwen2", "original")], repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    loaded = load_checkpoint(EngineConfig(model="OpenGVLab/InternVL-tiny"))
    assert loaded.path == repo / "snapshots" / commit and loaded.template.name == "internvl2_5"


# -- no checkpoint code runs -------------------------------------------------------------------------


def test_no_checkpoint_code_is_executed(tiny_checkpoints: Checkpoints, tmp_path: Path) -> None:
    path = copy_checkpoint(tiny_checkpoints[("internlm2", "original")], tmp_path / "ckpt")
    marker = tmp_path / "code-was-executed"
    payload = (
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text(__name__)\nraise RuntimeError('ran')\n"
    )
    modules = (
        "configuration_internvl_chat",
        "modeling_internvl_chat",
        "modeling_internlm2",
        "tokenization_internlm2",
    )
    for module in modules:
        (path / f"{module}.py").write_text(payload)
    config = json.loads((path / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_internvl_chat.InternVLChatModel"
    config["auto_map"].update(
        AutoConfig="configuration_internvl_chat.InternVLChatConfig",
        AutoModelForCausalLM="modeling_internvl_chat.InternVLChatModel",
    )
    (path / "config.json").write_text(json.dumps(config))
    edit_json(
        path / "tokenizer_config.json",
        lambda c: c.update(auto_map={"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]}),
    )
    loaded = load(path)
    assert not marker.exists()
    assert loaded.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>") == loaded.image_context_id


# -- templates and stop tokens -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("llm", "layout", "template"),
    [
        ("qwen2", "original", "internvl2_5"),
        ("internlm2", "original", "internlm2-chat"),
        ("qwen2", "hf", "internvl2_5"),  # no template field: the family's InternVL template
    ],
)
def test_template_from_checkpoint(
    tiny_checkpoints: Checkpoints, loaded: Loaded, llm: str, layout: str, template: str
) -> None:
    config = json.loads((tiny_checkpoints[(llm, layout)] / "config.json").read_text())
    assert config.get("template") == (template if layout == "original" else None)
    assert loaded(llm, layout).template.name == template


def test_template_field_of_original_checkpoint_is_used(tmp_path: Path) -> None:
    path = write_tiny_checkpoint(tmp_path / "ckpt", layout="original", llm="qwen2", template="Hermes-2")
    assert load(path).template.name == "Hermes-2"


def test_template_field_of_hf_checkpoint_is_used(tiny_checkpoints: Checkpoints, tmp_path: Path) -> None:
    path = copy_checkpoint(tiny_checkpoints[("qwen2", "hf")], tmp_path / "ckpt")
    edit_json(path / "config.json", lambda c: c.update(template="Hermes-2"))
    assert load(path).template.name == "Hermes-2"


@pytest.mark.parametrize("layout", ["original", "hf"])
def test_engine_config_template_overrides(tiny_checkpoints: Checkpoints, layout: str) -> None:
    loaded = load(tiny_checkpoints[("qwen2", layout)], template="Hermes-2")
    assert loaded.template.name == "Hermes-2"


def test_engine_config_unknown_template(tiny_checkpoints: Checkpoints) -> None:
    expect_error(tiny_checkpoints[("qwen2", "original")], "no-such-template", template="no-such-template")


def test_phi3_su_rope_loads_with_phi3s_own_frequencies(tmp_path: Path) -> None:
    """InternVL2-4B's llm_config writes Phi-3-mini-128k's LongRoPE as type "su" with the original
    context length at the top level; it loads, and gives the frequencies Phi-3's own su-scaled
    rotary embedding computes: short factors up to the original length, long ones past it, both
    scaled by sqrt(1 + log(scale) / log(original))."""
    import math

    path = write_tiny_checkpoint(tmp_path / "phi3", llm="phi3")
    llm = json.loads((path / "config.json").read_text())["llm_config"]
    assert llm["rope_scaling"]["type"] == "su" and "original_max_position_embeddings" in llm
    lm = load(path).model.model.language_model
    original, dim = llm["original_max_position_embeddings"], llm["hidden_size"] // llm["num_attention_heads"]
    factor = math.sqrt(1 + math.log(llm["max_position_embeddings"] / original) / math.log(original))
    for positions in (torch.arange(0, 64), torch.arange(original - 8, original + 40)):
        seq_len = int(positions.max()) + 1
        ext = torch.tensor(llm["rope_scaling"]["long_factor" if seq_len > original else "short_factor"])
        inv_freq = 1.0 / (ext * llm["rope_theta"] ** (torch.arange(0, dim, 2).float() / dim))
        freqs = torch.cat([positions[:, None].float() * inv_freq[None]] * 2, dim=-1)
        cos, sin = lm.rotary_emb(torch.zeros(1, dtype=torch.float32), positions[None])
        torch.testing.assert_close(cos[0], freqs.cos() * factor)
        torch.testing.assert_close(sin[0], freqs.sin() * factor)


def test_template_whose_stop_token_the_tokenizer_lacks(tiny_checkpoints: Checkpoints) -> None:
    # phi3-chat stops at <|end|>, which the tiny ChatML tokenizer does not have.
    expect_error(tiny_checkpoints[("qwen2", "original")], "<|end|>", template="phi3-chat")


@pytest.mark.parametrize("layout", ["original", "hf"])
@pytest.mark.parametrize("llm", LLMS)
def test_stop_token_ids_contain_the_template_stop_token(loaded: Loaded, llm: str, layout: str) -> None:
    ckpt = loaded(llm, layout)
    stop_id = ckpt.tokenizer.convert_tokens_to_ids(ckpt.template.stop_str)
    assert ckpt.template.stop_str == "<|im_end|>"
    assert stop_id in ckpt.stop_token_ids
    assert ckpt.tokenizer.eos_token_id in ckpt.stop_token_ids


@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_quantized_language_model_stays_close(mode: str, tiny_checkpoints, load_cached) -> None:
    pytest.importorskip("bitsandbytes")
    import torch

    from model_runtime.config import EngineConfig
    from model_runtime.loading.checkpoint import load_checkpoint

    path = tiny_checkpoints[("qwen2", "original")]
    full = load_cached(path)
    quant = load_checkpoint(EngineConfig(model=str(path), device="cpu", quantization=mode))
    linear_types = {type(m).__name__ for m in quant.model.model.language_model.modules()}
    assert ("Linear8bitLt" if mode == "8bit" else "Linear4bit") in linear_types
    assert "Linear" not in linear_types  # every LLM linear layer was replaced
    ids = torch.tensor([[50, 90, 22, 31, 40, 7, 8]])
    with torch.inference_mode():
        reference = full.model(input_ids=ids).logits
        approx = quant.model(input_ids=ids).logits
    # Quantization error, not a broken model: far closer to the full-precision logits than their spread.
    error = (approx - reference).abs().mean() / reference.std()
    assert error < (0.05 if mode == "8bit" else 0.3)


def test_unknown_quantization_is_refused(tiny_checkpoints) -> None:
    from pydantic import ValidationError

    from model_runtime.config import EngineConfig
    from model_runtime.loading.checkpoint import load_checkpoint

    model = str(tiny_checkpoints[("qwen2", "original")])
    with pytest.raises(ValidationError, match="8bit"):  # the config itself refuses it
        EngineConfig(model=model, quantization="3bit")
    with pytest.raises(CheckpointError, match="unknown quantization"):  # and so does the loader
        load_checkpoint(
            EngineConfig.model_construct(**{**EngineConfig(model=model).model_dump(), "quantization": "3bit"})
        )
