"""The same parity checks on a CUDA device in bfloat16 (skipped without a GPU)."""

from __future__ import annotations

import pytest

from model_runtime.sampling_params import SamplingParams
from tests.test_engine import CHATS, GREEDY, Harness

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", params=["qwen2", "internlm2"])
def gpu_harness(request, tmp_path_factory):
    from model_runtime.loading.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path_factory.mktemp(f"gpu-{request.param}"), llm=request.param)
    return Harness(path, device="cuda", dtype="bfloat16")


def test_loads_in_bf16_on_the_gpu(gpu_harness: Harness) -> None:
    import torch

    assert gpu_harness.loaded.dtype == torch.bfloat16
    assert next(gpu_harness.loaded.model.parameters()).device.type == "cuda"


@pytest.mark.parametrize("name", list(CHATS))
def test_greedy_matches_transformers_generate_in_bf16(gpu_harness: Harness, name: str) -> None:
    request = gpu_harness.add(f"gpu-{name}", CHATS[name], GREEDY)
    reference = gpu_harness.reference(gpu_harness.request("ref", CHATS[name], GREEDY), 12)
    gpu_harness.run()
    assert request.seqs[0].output_ids == reference


def test_batched_requests_finish_and_free_the_cache(gpu_harness: Harness) -> None:
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    requests = [gpu_harness.add(f"gpu-b{i}", chat, params) for i, chat in enumerate(list(CHATS.values()) * 4)]
    gpu_harness.run()
    assert all(len(r.seqs[0].output_ids) == 16 for r in requests)
    assert gpu_harness.engine.stats().cache_used_blocks == 0
