"""The logits -> token step: greedy, filters, per-row generators, penalties and logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from model_runtime.engine.sampler import (
    BatchSamplingState,
    apply_penalties,
    apply_temperature_top_k_top_p_min_p,
    compute_logprobs,
    make_generator,
    sample,
    token_counts,
)
from model_runtime.sampling_params import SamplingParams

V = 32


def state_for(*params: SamplingParams) -> BatchSamplingState:
    return BatchSamplingState.from_params(list(params), V, "cpu")


def random_logits(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, V, generator=torch.Generator().manual_seed(seed))  # [B, V]


def test_greedy_is_argmax_with_lowest_id_on_ties() -> None:
    logits = random_logits(3)
    logits[2] = 0.0
    logits[2, 5] = logits[2, 9] = 4.0
    state = state_for(
        SamplingParams(temperature=0.0), SamplingParams(top_k=1), SamplingParams(temperature=0.0)
    )
    assert state.all_greedy
    assert sample(logits, state, [None] * 3).tolist() == [*logits[:2].argmax(-1).tolist(), 5]


def test_greedy_rows_inside_a_sampled_batch() -> None:
    logits = random_logits(2)
    state = state_for(SamplingParams(temperature=0.0), SamplingParams(temperature=1.0))
    for _ in range(5):
        assert sample(logits, state, [None, None])[0] == logits[0].argmax()


def test_seeded_rows_reproducible_whatever_the_neighbours() -> None:
    seeded = SamplingParams(temperature=1.0, seed=1234)
    target = random_logits(1, seed=7)[0] * 0.2  # flat enough that draws vary

    def draws(neighbours: int, neighbour_seed: int | None) -> list[int]:
        logits = torch.cat([random_logits(neighbours, seed=99), target.unsqueeze(0)])
        params = [SamplingParams(temperature=0.7, seed=neighbour_seed)] * neighbours + [seeded]
        generators = [None if p.seed is None else make_generator(p.seed, "cpu") for p in params]
        state = state_for(*params)
        return [int(sample(logits, state, generators)[-1]) for _ in range(20)]

    alone = draws(0, None)
    assert len(set(alone)) > 1
    assert draws(3, None) == alone
    assert draws(5, 42) == alone


def test_top_k_one_and_tiny_top_p_are_argmax() -> None:
    logits = random_logits(4, seed=3)
    top_k = apply_temperature_top_k_top_p_min_p(logits, torch.ones(4), top_k=torch.ones(4, dtype=torch.long))
    tiny_p = apply_temperature_top_k_top_p_min_p(logits, torch.ones(4), top_p=torch.full((4,), 1e-6))
    for filtered in (top_k, tiny_p):
        assert (filtered.isfinite().sum(-1) == 1).all()
        assert torch.equal(filtered.argmax(-1), logits.argmax(-1))
    state = state_for(*[SamplingParams(top_p=1e-6, seed=s) for s in range(4)])
    gens = [make_generator(s, "cpu") for s in range(4)]
    assert torch.equal(sample(logits, state, gens), logits.argmax(-1))


def test_top_k_keeps_k_and_ties() -> None:
    logits = torch.tensor([[5.0, 4.0, 4.0, 1.0, 0.0]])
    out = apply_temperature_top_k_top_p_min_p(logits, torch.ones(1), top_k=torch.tensor([2]))
    assert out.isfinite().tolist() == [[True, True, True, False, False]]


def test_top_p_keeps_smallest_set_reaching_p() -> None:
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    out = apply_temperature_top_k_top_p_min_p(logits, torch.ones(1), top_p=torch.tensor([0.79]))
    assert out.isfinite().tolist() == [[True, True, False, False]]
    out = apply_temperature_top_k_top_p_min_p(logits, torch.ones(1), top_p=torch.tensor([0.81]))
    assert out.isfinite().tolist() == [[True, True, True, False]]


def test_min_p() -> None:
    logits = torch.tensor([[0.5, 0.2, 0.1, 0.04]]).log()
    out = apply_temperature_top_k_top_p_min_p(logits, torch.ones(1), min_p=torch.tensor([0.3]))
    assert out.isfinite().tolist() == [[True, True, False, False]]
    off = apply_temperature_top_k_top_p_min_p(logits, torch.ones(1), min_p=torch.tensor([0.0]))
    assert off.isfinite().all()


def test_temperature_scales() -> None:
    logits = torch.tensor([[2.0, -4.0]])
    assert apply_temperature_top_k_top_p_min_p(logits, torch.tensor([0.5])).tolist() == [[4.0, -8.0]]


def test_penalties_change_the_right_logits() -> None:
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0, 1.0, 1.0]])
    prompt = token_counts([[0, 1]], 6, "cpu")
    output = token_counts([[2, 3, 3]], 6, "cpu")
    rep = apply_penalties(logits, prompt, output, torch.tensor([2.0]), torch.zeros(1), torch.zeros(1))
    assert rep.tolist() == [[1.0, -4.0, 1.0, -4.0, 1.0, 1.0]]
    pf = apply_penalties(logits, prompt, output, torch.ones(1), torch.tensor([0.5]), torch.tensor([0.25]))
    # Prompt tokens 0 and 1 untouched; token 2 once (0.5 + 0.25), token 3 twice (0.5 + 0.5).
    assert pf.tolist() == [[2.0, -2.0, 1.25, -3.0, 1.0, 1.0]]


def test_virtual_ids_are_ignored() -> None:
    counts = token_counts([[1, V, V + 5, -1], []], V, "cpu")
    assert counts.shape == (2, V) and counts.sum().item() == 1 and counts[0, 1] == 1


def test_state_flags_and_disabled_filters() -> None:
    state = state_for(
        SamplingParams(top_k=-1), SamplingParams(top_k=0, temperature=0.0, repetition_penalty=1.2)
    )
    assert state.top_k.tolist() == [V, V]
    assert not state.any_top_k and not state.any_top_p and not state.any_min_p
    assert state.any_repetition and not state.any_presence_frequency and state.any_penalty
    assert state.greedy.tolist() == [False, True] and state.temperature.tolist() == [1.0, 1.0]


def test_sampling_follows_the_distribution() -> None:
    logits = torch.tensor([[0.7, 0.2, 0.1]]).log().expand(4000, 3).contiguous()
    state = BatchSamplingState.from_params([SamplingParams()] * 4000, 3, "cpu")
    torch.manual_seed(0)
    freq = torch.bincount(sample(logits, state, [None] * 4000), minlength=3).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.03)


def test_logprobs_are_of_the_raw_distribution() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    out = compute_logprobs(logits, torch.tensor([0, 2]), [2, 0])
    log_z = math.log(math.exp(1) + math.exp(2) + math.exp(3))
    assert out[0].token_id == 0 and out[0].logprob == pytest.approx(1.0 - log_z)
    assert [t for t, _ in out[0].top] == [2, 1]
    assert [lp for _, lp in out[0].top] == pytest.approx([3.0 - log_z, 2.0 - log_z])
    assert out[1].logprob == pytest.approx(-math.log(3)) and out[1].top == ()
    assert compute_logprobs(logits, torch.tensor([1, 1]), [0, 0])[0].top == ()
