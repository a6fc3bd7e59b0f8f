"""Critic-free estimators against hand-computed values and loop references."""

import statistics

import numpy as np
import pytest
import torch

from rlhf_ray.ops import (discounted_returns, grpo_advantages, kl_penalized_rewards, reinforce_pp_advantages,
                          rloo_advantages, sequence_to_tokens)


def test_grpo_by_hand_ties_and_a_loop_reference():
    got = grpo_advantages(torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]]))
    # group 1: mean 2, unbiased std 1; group 2 ties: std 0, every advantage 0
    torch.testing.assert_close(got, torch.tensor([[-1 / 1.0001, 0.0, 1 / 1.0001], [0.0, 0.0, 0.0]]))
    scores = torch.randn(4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for g, row in enumerate(scores.tolist()):
        mean, std = statistics.fmean(row), statistics.stdev(row)
        expect = [(s - mean) / (std + 1e-4) for s in row]
        np.testing.assert_allclose(grpo_advantages(scores)[g].numpy(), expect, rtol=0, atol=1e-12)


def test_rloo_by_hand_and_a_loop_reference():
    torch.testing.assert_close(rloo_advantages(torch.tensor([[1.0, 2.0, 3.0]])), torch.tensor([[-1.5, 0.0, 1.5]]))
    scores = torch.randn(3, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for g, row in enumerate(scores.tolist()):
        expect = [s - statistics.fmean(row[:i] + row[i + 1:]) for i, s in enumerate(row)]
        np.testing.assert_allclose(rloo_advantages(scores)[g].numpy(), expect, rtol=0, atol=1e-12)
    assert rloo_advantages(scores).sum(dim=1).abs().max() < 1e-12  # each group's advantages sum to 0


@pytest.mark.parametrize("estimator", [grpo_advantages, rloo_advantages])
def test_a_group_of_one_is_an_error_naming_the_field(estimator):
    with pytest.raises(ValueError, match=r"at least 2 samples per prompt .*\(ppo.samples_per_prompt=1\)"):
        estimator(torch.tensor([[1.0], [2.0]]))
    with pytest.raises(ValueError, match=r"\[G prompts, n samples\]"):
        estimator(torch.tensor([1.0, 2.0]))


def test_sequence_advantages_land_on_response_tokens_only():
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1]])
    torch.testing.assert_close(sequence_to_tokens(torch.tensor([2.0, -1.0]), mask),
                               torch.tensor([[0.0, 2.0, 2.0, 0.0], [0.0, 0.0, -1.0, -1.0]]))


def test_discounted_returns_against_a_loop():
    gen = torch.Generator().manual_seed(2)
    rewards = torch.randn(3, 7, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    for gamma in (1.0, 0.9):
        got = discounted_returns(rewards, mask, gamma)
        for b in range(3):
            expect, run = np.zeros(7), 0.0
            for t in reversed(range(7)):
                run = (rewards[b, t].item() if mask[b, t] else 0.0) + gamma * run
                expect[t] = run if mask[b, t] else 0.0
            np.testing.assert_allclose(got[b].numpy(), expect, rtol=0, atol=1e-12)


def test_reinforce_pp_by_hand():
    """Sequence score on the last token minus the KL penalty on every token, returns with gamma = 1,
    whitened over the batch's response tokens."""
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0]])
    old = torch.tensor([[0.0, -1.0, -1.0, -1.0], [0.0, -2.0, -2.0, 0.0]])
    ref = old - 0.5  # log pi_old - log pi_ref = 0.5 on every token
    rewards, _ = kl_penalized_rewards(torch.tensor([2.0, -1.0]), old, ref, mask, kl_coef=0.2)
    torch.testing.assert_close(rewards, torch.tensor([[0.0, -0.1, -0.1, 1.9], [0.0, -0.1, -1.1, 0.0]]))
    adv, returns = reinforce_pp_advantages(rewards, mask)
    torch.testing.assert_close(returns, torch.tensor([[0.0, 1.7, 1.8, 1.9], [0.0, -1.2, -1.1, 0.0]]))
    tokens = np.array([1.7, 1.8, 1.9, -1.2, -1.1])
    whitened = (tokens - tokens.mean()) / np.sqrt(tokens.var(ddof=1) + 1e-8)
    np.testing.assert_allclose(adv[mask.bool()].numpy(), whitened, rtol=0, atol=1e-6)
    assert (adv[~mask.bool()] == 0).all()
